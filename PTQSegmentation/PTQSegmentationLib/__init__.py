"""Python files of the PTQSegmentation module besides PTQSegmentation.py (a package: Slicer would take a .py
file next to PTQSegmentation.py for a module)."""
