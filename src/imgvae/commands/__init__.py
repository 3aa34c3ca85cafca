"""The command line and the verbs as functions of paths (open a model, read images, call the
library, write files). Nothing in the library imports this package."""
