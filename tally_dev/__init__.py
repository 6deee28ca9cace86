"""Development tooling kept out of the product: benchmark harness and peers, engine launcher,
development cluster, demo."""
