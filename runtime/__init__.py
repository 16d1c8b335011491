"""trtserve runtime package."""
