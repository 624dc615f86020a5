//! Compile-time helpers of the `ferrybox` crate. Use them through it: `ferrybox::contract!`.

#![warn(missing_docs)]

use std::path::Path;

use proc_macro::TokenStream;
use quote::quote;

/// Embeds a consumer contract and every reader schema it names: `contract!("contracts/users.toml")`,
/// the path relative to the calling crate's `Cargo.toml`. Each file is named once, in the
/// contract; the macro reads the contract at compile time and embeds it and its schemas with
/// `include_str!` (so a change to any of them rebuilds the crate). A contract that is not
/// valid TOML, has no `[messages]`, or names a schema file that is not there fails the build.
///
/// Expands to a `ferrybox::contract::EmbeddedContract`.
#[proc_macro]
pub fn contract(input: TokenStream) -> TokenStream {
    let path = syn::parse_macro_input!(input as syn::LitStr);
    match expand(&path.value()) {
        Ok(tokens) => tokens.into(),
        Err(message) => syn::Error::new(path.span(), message)
            .to_compile_error()
            .into(),
    }
}

fn expand(relative: &str) -> Result<proc_macro2::TokenStream, String> {
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .map_err(|_| "CARGO_MANIFEST_DIR is not set: build with cargo".to_owned())?;
    let file = Path::new(&root).join(relative);
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("contract {relative} ({}): {e}", file.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("contract {relative} is not valid TOML: {e}"))?;
    let messages = table
        .get("messages")
        .and_then(toml::Value::as_table)
        .ok_or_else(|| format!("contract {relative} has no [messages] table"))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for (message_type, schema) in messages {
        let name = schema.as_str().ok_or_else(|| {
            format!("contract {relative}: {message_type} must name its reader schema's file")
        })?;
        let schema_path = dir.join(name);
        if !schema_path.is_file() {
            return Err(format!(
                "contract {relative}: the reader schema of {message_type}, {name}, is not at {}",
                schema_path.display()
            ));
        }
        let absolute = schema_path.to_string_lossy().into_owned();
        files.push(quote! { (#name, ::core::include_str!(#absolute)) });
    }
    let absolute = file.to_string_lossy().into_owned();
    Ok(quote! {
        ::ferrybox::contract::EmbeddedContract {
            path: #relative,
            text: ::core::include_str!(#absolute),
            files: &[#(#files),*],
        }
    })
}
