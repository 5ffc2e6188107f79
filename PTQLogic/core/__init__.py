"""Shared foundation: errors, progress/cancel, files, the Volume and ModelSpec types, machine facts. Imports nothing else of PTQLogic."""
