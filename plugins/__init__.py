"""trtserve plugins package."""
