"""psctl: the command line, and the one package that imports every role."""
