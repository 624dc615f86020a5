// Validates AsyncAPI documents with the official parser (@asyncapi/parser) and its Avro schema
// parser, so Avro payloads are checked as Avro. Usage: node validate.cjs <modules dir> <file>...
// Prints every diagnostic; exits 1 when one is an error, or a document did not parse.
'use strict';
const path = require('path');
const fs = require('fs');

const modules = process.argv[2];
const files = process.argv.slice(3);
const { Parser } = require(path.join(modules, '@asyncapi/parser'));
const { AvroSchemaParser } = require(path.join(modules, '@asyncapi/avro-schema-parser'));

async function main() {
  const parser = new Parser();
  parser.registerSchemaParser(AvroSchemaParser());
  let failed = false;
  for (const file of files) {
    const { document, diagnostics } = await parser.parse(fs.readFileSync(file, 'utf8'), {
      source: path.resolve(file),
    });
    for (const d of diagnostics) {
      // Severity 0 is an error; 1 a warning, 2 information, 3 a hint.
      console.log(`${file}: [${['error', 'warning', 'info', 'hint'][d.severity]}] ${d.code}: ${d.message} at /${d.path.join('/')}`);
    }
    if (!document || diagnostics.some((d) => d.severity === 0)) {
      failed = true;
      console.log(`${file}: invalid`);
    } else {
      console.log(`${file}: valid AsyncAPI ${document.version()}, ${document.channels().length} channel(s), ${document.operations().length} operation(s), ${document.components().messages().length} message(s)`);
    }
  }
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
