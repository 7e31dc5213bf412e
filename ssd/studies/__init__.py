"""Studies: measurements run around the product (the BatchNorm study), imported only by their scripts and
the command line, never by the product's modules."""
