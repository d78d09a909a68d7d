"""The partitions of the sync's assets: listing ranges (carsync_dagster.ranges), added and removed
as the feed grows and shrinks."""

from dagster import DynamicPartitionsDefinition

listing_ranges = DynamicPartitionsDefinition(name="listing_ranges")
