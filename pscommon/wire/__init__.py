"""Generated protobuf and gRPC stubs (see protos/). Regenerate with `make proto`; never edit."""
