"""Transport: gRPC servicers; the only place that knows protobuf."""
