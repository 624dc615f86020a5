//! The contract check on fixture schemas: it passes a compatible change and fails, naming
//! producer, consumer, message, version and field, on each kind of breaking change. No server.

use std::path::{Path, PathBuf};

use ferrybox::contract::{ConsumerContract, Finding, ProducerCatalog, check};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/contracts")
}

fn findings(case: &str) -> Vec<String> {
    let catalog = ProducerCatalog::load(&fixtures().join(case).join("schemas")).unwrap();
    let contracts = ConsumerContract::load_dir(&fixtures().join("consumer/contracts")).unwrap();
    check(&catalog, &contracts)
        .iter()
        .map(Finding::to_string)
        .collect()
}

fn assert_found(findings: &[String], expected: &str) {
    assert!(
        findings.iter().any(|f| f.contains(expected)),
        "no finding contains {expected:?}: {findings:#?}"
    );
}

#[test]
fn a_new_optional_field_passes() {
    assert_eq!(findings("compatible"), Vec::<String>::new());
}

#[test]
fn removing_a_field_the_consumer_reads_breaks_it() {
    let f = findings("removed_field");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_found(
        &f,
        "BREAKING p -> c: t/x.User v2: field 'email' is read but not written",
    );
}

#[test]
fn changing_a_field_type_breaks_producer_and_consumer() {
    let f = findings("changed_type");
    assert_found(
        &f,
        "INCOMPATIBLE p: t/x.User v2: the new version cannot read data written with v1: field 'age': written as int, read as string",
    );
    assert_found(
        &f,
        "BREAKING p -> c: t/x.User v2: field 'age': written as string, read as int",
    );
}

#[test]
fn renaming_an_enum_symbol_breaks_producer_and_consumer() {
    let f = findings("renamed_enum_symbol");
    assert_found(
        &f,
        "INCOMPATIBLE p: t/x.User v2: the new version cannot read data written with v1: field 'status': enum x.Status symbol 'SUSPENDED'",
    );
    assert_found(
        &f,
        "BREAKING p -> c: t/x.User v2: field 'status': enum x.Status symbol 'BANNED' is written but unknown to the reader",
    );
}

#[test]
fn a_new_required_field_breaks_backward_compatibility() {
    let f = findings("new_required_field");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_found(
        &f,
        "INCOMPATIBLE p: t/x.User v2: the new version cannot read data written with v1: field 'tier' is read but not written (removed, renamed or new), and the reader gives it no default (under BACKWARD)",
    );
}

#[test]
fn the_workspace_contracts_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = ProducerCatalog::load(&root.join("schemas")).unwrap();
    let contracts = ConsumerContract::load_dir(&root.join("auth-service/contracts")).unwrap();
    assert!(!contracts.is_empty());
    assert_eq!(check(&catalog, &contracts), Vec::new());
}

#[test]
fn malformed_inputs_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("fb-contracts-{}", std::process::id()));
    let type_dir = dir.join("t/x.User");
    std::fs::create_dir_all(&type_dir).unwrap();
    std::fs::write(
        dir.join("t/producer.toml"),
        "producer = \"p\"\ncompatibility = \"SIDEWAYS\"\n",
    )
    .unwrap();
    std::fs::write(
        type_dir.join("v1.avsc"),
        r#"{"type":"record","name":"User","namespace":"x","fields":[]}"#,
    )
    .unwrap();
    let err = ProducerCatalog::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("producer.toml") && err.contains("SIDEWAYS"),
        "{err}"
    );
    std::fs::write(dir.join("t/producer.toml"), "producer = \"p\"\n").unwrap();
    std::fs::write(
        type_dir.join("v3.avsc"),
        r#"{"type":"record","name":"User","namespace":"x","fields":[]}"#,
    )
    .unwrap();
    let err = ProducerCatalog::load(&dir).unwrap_err().to_string();
    assert!(err.contains("without gaps"), "{err}");
    std::fs::remove_file(type_dir.join("v3.avsc")).unwrap();
    std::fs::write(
        type_dir.join("v2.avsc"),
        r#"{"type":"record","name":"Other","fields":[]}"#,
    )
    .unwrap();
    let err = ProducerCatalog::load(&dir).unwrap_err().to_string();
    assert!(err.contains("folder's name"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
