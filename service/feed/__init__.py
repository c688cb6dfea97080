"""The change feed: the hub that fans committed changes out, the streams, and their recorded deliveries."""
