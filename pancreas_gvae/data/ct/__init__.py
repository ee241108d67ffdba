"""CT data: discovery, checks, pairing, slice sets, preparation into the cache, manifest, phantom, TCIA download."""
