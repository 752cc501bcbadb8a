"""The SAM-SGA minimax in plain torch: generator, losses, one step, the single-process trainer."""
