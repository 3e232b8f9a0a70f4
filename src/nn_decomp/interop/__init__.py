"""Other libraries' formats and tools: writers and readers of their on-disk formats (`saelens`,
`circuit_tracer`, and what both share in `formats`), and `bridge`, which runs a foreign tool with its
own pins in that tool's own Python, through a request file and a versioned response (`workers/`)."""
