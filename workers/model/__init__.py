"""Pure torch model math for Mixtral: no torch.distributed, Ray or gRPC in here."""
