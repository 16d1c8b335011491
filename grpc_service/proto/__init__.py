"""Generated gRPC code for trtserve.proto (committed; `make proto` regenerates it)."""
