"""trtserve grpc_service package."""
