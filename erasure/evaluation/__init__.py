"""Named, versioned evaluation protocols (nudity-i2p-v1, retain-fid-v1) and their reports."""
