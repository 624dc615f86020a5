# The project's commands. Each brings up the local infrastructure it needs (PostgreSQL, the
# tansu broker, the schema registry; see deploy/local/infra.sh) and stops what it started.

INFRA := deploy/local/infra.sh

.PHONY: demo test lint infra-up infra-down infra-status

## make demo: the whole flow on a local broker and database, with a summary.
demo:
	cargo build --workspace --bins
	$(INFRA) run cargo run --quiet -p ferrybox-e2e --bin demo

## make test: formatting, lints and every test in the workspace (what CI runs).
test: lint
	$(INFRA) run cargo test --workspace --no-fail-fast

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

infra-up:
	$(INFRA) up

infra-down:
	$(INFRA) down

infra-status:
	$(INFRA) status
