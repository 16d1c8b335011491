"""trtserve builder package."""
