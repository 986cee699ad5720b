"""What the pipeline commands share (torch, MLflow, DVC side); never shipped in the Bento."""
