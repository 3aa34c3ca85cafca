"""Images in: decoding to the seed's uint8 views, sources (folders, zips, embedded photos,
prepared caches), `prepare`, datasets (unreadable files skipped, with their reasons), loaders."""
