"""MLX networks, one file per family (emoji.py, jit.py, dit.py), and the frozen encoders'
networks (text.py: MiniLM/BERT, t5.py, vae.py).

Networks only: nothing here reads a file. Finding and loading encoder weights is
mlxflow/encoders.py's job; checkpoint weights go in through mlxflow.families.load_model.
"""
