//! Placeholder library target of the workspace root package (tests, benches and examples live beside it).
