"""The bridge the Slicer module uses (no Slicer imports): model choice, background processes, dependencies."""
