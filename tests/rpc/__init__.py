"""RPC tier: real gRPC servers in-process on port 0, real channels. (A package so that its
module names cannot collide with same-named tests in other tiers.)"""
