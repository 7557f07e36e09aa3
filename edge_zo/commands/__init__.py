"""One module per `edge-zo` command, each with its own `main(argv)`."""
