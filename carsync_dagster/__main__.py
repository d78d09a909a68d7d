from carsync_dagster.cli import main

main()
