"""Runs the stages on Ray Data: a read task per shard, an actor pool per stage, the driver writing shard outputs."""
