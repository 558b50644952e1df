"""AdaTape's parity task (Xue et al. 2023): the sequences, the training of AdaTape, a Transformer
and a Universal Transformer on them, and the `burrow adatape parity` command. Importing this
package loads no torch: the command line's help reads cli_args.py."""
