"""Crawling image boards: site tables, the HTTP client, listing by id range, downloading into shards."""
