"""Generated gRPC/protobuf code for the inventory.v1 API (built from protos/ at install time)."""
