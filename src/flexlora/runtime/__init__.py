"""Runtimes move ClientTasks to clients and ClientUpdates back; they never do the math."""
