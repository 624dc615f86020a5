#!/usr/bin/env python3
"""Drives a schema registry with Confluent's own Python client (confluent-kafka's
SchemaRegistryClient, and its fastavro-based Avro serde), the way users' tools call it.

    python confluent_client.py [--keep-going] http://127.0.0.1:8081

Every check asserts what Confluent's registry answers (status, error code, body). The script
stops at the first failure with a message naming the check and exits 1; otherwise it prints
how many checks passed and exits 0. With --keep-going it runs every check and reports each
failure (to survey a registry; later checks can fail for want of what an earlier one made). Subjects get a random prefix, so runs against a shared
registry do not collide, and the subjects a run made are hard-deleted at the end; the global
compatibility level is put back as it was.

Install the client with `deploy/local/infra.sh registry-client` (it prints the python to run
this with). It is written for the pinned version in requirements.txt.
"""

import json
import sys
import traceback
import urllib.error
import urllib.request
import uuid

import confluent_kafka
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"


class Failed(Exception):
    """A check's assertion failed."""


def ensure(condition, message):
    if not condition:
        raise Failed(message)


def equal(actual, expected, what):
    ensure(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


class Run:
    """The registry under test and the checks done so far."""

    def __init__(self, url, keep_going=False):
        self.url = url.rstrip("/")
        self.keep_going = keep_going
        self.passed = []
        self.failed = []
        self.prefix = f"conformance-{uuid.uuid4().hex[:12]}"
        # A namespace of this run's own, so its schema texts (and ids) are new to the registry.
        self.namespace = f"conformance.run{uuid.uuid4().hex[:12]}"
        self.subjects = set()
        # The global level before the run, put back at the end.
        self.original_global = None

    def client(self):
        """A client with empty caches: what it returns came from the registry, not a cache.
        No retries, so a failure shows at once."""
        return SchemaRegistryClient({"url": self.url, "max.retries": 0})

    def subject(self, name):
        subject = f"{self.prefix}-{name}"
        self.subjects.add(subject)
        return subject

    def check(self, name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any exception fails the check
            print(f"FAIL {name}: {type(e).__name__}: {e}", file=sys.stderr)
            if self.keep_going:
                self.failed.append(name)
                return
            traceback.print_exc(file=sys.stderr)
            print(f"{len(self.passed)} checks passed before the failure", file=sys.stderr)
            self.cleanup()
            sys.exit(1)
        self.passed.append(name)
        print(f"ok   {name}")

    def raw(self, method, path, body=None):
        """An HTTP call without the client: (status, headers, parsed JSON body or raw text)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", MEDIA_TYPE)
        if data is not None:
            request.add_header("Content-Type", MEDIA_TYPE)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, headers, text = response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            status, headers, text = e.code, e.headers, e.read()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text.decode(errors="replace")
        return status, headers, parsed

    def cleanup(self):
        client = self.client()
        if self.original_global is not None:
            try:
                client.set_compatibility(level=self.original_global)
            except Exception:  # noqa: BLE001 - best effort, like the rest of the cleanup
                pass
        for subject in sorted(self.subjects):
            for permanent in (False, True):
                try:
                    client.delete_subject(subject, permanent=permanent)
                except Exception:  # noqa: BLE001 - best effort: it may be gone already
                    pass

    def record(self, name, fields):
        return json.dumps(
            {"type": "record", "name": name, "namespace": self.namespace, "fields": fields}
        )


def expect_error(fn, status, code):
    """Calls fn, which must fail with a registry error of this HTTP status and error code."""
    try:
        result = fn()
    except SchemaRegistryError as e:
        equal(
            (e.http_status_code, e.error_code),
            (status, code),
            f"(HTTP status, error_code) of '{e.error_message}'",
        )
        return e
    raise Failed(f"expected HTTP {status} with error_code {code}, got a success: {result!r}")


def expect_confluent_error(reply, status, code):
    """A raw reply must be Confluent's error shape: JSON {"error_code", "message"}."""
    got_status, headers, body = reply
    equal(got_status, status, "HTTP status")
    ensure(
        isinstance(body, dict) and isinstance(body.get("message"), str),
        f"the error body is not Confluent's JSON {{error_code, message}}: {body!r}",
    )
    equal(body.get("error_code"), code, "error_code")
    ensure(
        "json" in (headers.get("Content-Type") or ""),
        f"an error must be JSON, Content-Type was {headers.get('Content-Type')!r}",
    )


def main(url, keep_going):
    run = Run(url, keep_going)
    print(
        f"Confluent's Python client {confluent_kafka.version()[0]} against {run.url} "
        f"(subjects {run.prefix}-*)"
    )
    s = run.subject("users-value")
    other = run.subject("other-value")
    v1 = Schema(run.record("User", [{"name": "id", "type": "string"}]), "AVRO")
    v2 = Schema(
        run.record(
            "User",
            [
                {"name": "id", "type": "string"},
                {"name": "nick", "type": ["null", "string"], "default": None},
            ],
        ),
        "AVRO",
    )
    # A new required field without a default: old data cannot be read with it (not BACKWARD).
    v3_incompatible = Schema(
        run.record("User", [{"name": "id", "type": "string"}, {"name": "age", "type": "int"}]),
        "AVRO",
    )
    never_registered = Schema(run.record("Nobody", [{"name": "x", "type": "long"}]), "AVRO")
    ids = {}

    # --- global config first, so the checks below run under BACKWARD whatever the registry had
    run.original_global = run.client().get_compatibility()

    def global_config():
        client = run.client()
        equal(client.set_compatibility(level="FULL"), {"compatibility": "FULL"}, "PUT /config")
        equal(run.client().get_compatibility(), "FULL", "global level after PUT")
        client.set_compatibility(level="BACKWARD")
        equal(run.client().get_compatibility(), "BACKWARD", "global level after PUT")

    run.check("set_compatibility / get_compatibility (global)", global_config)

    # --- register, read back ---------------------------------------------------------------
    def register():
        ids["v1"] = run.client().register_schema(s, v1)
        ensure(isinstance(ids["v1"], int) and ids["v1"] > 0, f"schema id {ids['v1']!r}")
        # Again: the same id and no new version.
        equal(run.client().register_schema(s, v1), ids["v1"], "id of a re-registration")
        equal(run.client().get_versions(s), [1], "versions after registering twice")
        # The same schema under another subject shares the global id.
        equal(run.client().register_schema(other, v1), ids["v1"], "id under another subject")

    run.check("register_schema", register)

    def register_full_response():
        registered = run.client().register_schema_full_response(s, v2)
        ids["v2"] = registered.schema_id
        ensure(ids["v2"] != ids["v1"], "a new schema got an existing id")

    run.check("register_schema_full_response (evolution, BACKWARD)", register_full_response)

    def lookup():
        found = run.client().lookup_schema(s, v1)
        equal((found.subject, found.version, found.schema_id), (s, 1, ids["v1"]), "lookup of v1")
        found = run.client().lookup_schema(s, v2)
        equal((found.subject, found.version, found.schema_id), (s, 2, ids["v2"]), "lookup of v2")

    run.check("lookup_schema", lookup)

    def by_id():
        schema = run.client().get_schema(ids["v1"])
        equal(json.loads(schema.schema_str), json.loads(v1.schema_str), "schema text by id")
        equal(schema.schema_type, "AVRO", "schema type")

    run.check("get_schema", by_id)

    def by_version():
        got = run.client().get_version(s, 1)
        equal((got.subject, got.version, got.schema_id), (s, 1, ids["v1"]), "version 1")
        equal(json.loads(got.schema.schema_str), json.loads(v1.schema_str), "version 1's schema")
        latest = run.client().get_latest_version(s)
        equal((latest.version, latest.schema_id), (2, ids["v2"]), "latest version")
        equal(run.client().get_version(s, "latest").version, 2, "version 'latest'")

    run.check("get_version / get_latest_version", by_version)

    def listing():
        subjects = run.client().get_subjects()
        ensure(s in subjects and other in subjects, f"{s} and {other} not in {subjects}")
        equal(sorted(run.client().get_subjects(subject_prefix=run.prefix)), sorted([s, other]),
              "subjects with this run's prefix")
        equal(run.client().get_versions(s), [1, 2], "versions")
        equal(sorted(run.client().get_subjects_by_schema_id(ids["v1"])), sorted([s, other]),
              "subjects of schema v1")
        equal(
            sorted((v.subject, v.version) for v in run.client().get_schema_versions(ids["v1"])),
            sorted([(s, 1), (other, 1)]),
            "subject versions of schema v1",
        )
        ensure("AVRO" in run.client().get_schema_types(), "AVRO is not a supported type")

    run.check("get_subjects / get_versions / schema usages / schema types", listing)

    # --- compatibility -----------------------------------------------------------------------
    def compatibility():
        client = run.client()
        equal(client.test_compatibility(s, v3_incompatible), False, "v3 against latest")
        equal(client.test_compatibility(s, v2), True, "v2 against latest")
        equal(client.test_compatibility(s, v3_incompatible, version=1), False, "v3 against 1")
        equal(client.test_compatibility_all_versions(s, v3_incompatible), False, "v3 against all")
        equal(client.test_compatibility_all_versions(s, v2), True, "v2 against all")
        # A subject with no versions accepts anything.
        equal(client.test_compatibility_all_versions(run.subject("empty"), v3_incompatible),
              True, "against a subject with no versions")

    run.check("test_compatibility / test_compatibility_all_versions", compatibility)

    def compatibility_verbose():
        client = run.client()
        # The client sends Python's spelling: verbose=True, normalize=False.
        equal(client.test_compatibility(s, v3_incompatible, verbose=True), False,
              "v3 against latest, verbose")
        equal(client.test_compatibility_all_versions(s, v2, verbose=True), True,
              "v2 against all, verbose")
        # The client returns only the boolean; the messages are in the body.
        for spelling in ("True", "TRUE", "true"):
            status, _, body = run.raw(
                "POST",
                f"/compatibility/subjects/{s}/versions/latest?verbose={spelling}",
                v3_incompatible.to_dict(),
            )
            equal(status, 200, f"status with verbose={spelling}")
            equal(body.get("is_compatible"), False, f"is_compatible with verbose={spelling}")
            messages = body.get("messages")
            ensure(isinstance(messages, list) and messages,
                   f"verbose={spelling} gave no messages: {body!r}")
        status, _, body = run.raw(
            "POST", f"/compatibility/subjects/{s}/versions?verbose=False", v2.to_dict()
        )
        equal((status, body), (200, {"is_compatible": True}), "verbose=False answer")

    run.check("test_compatibility verbose=True", compatibility_verbose)

    def incompatible_registration():
        e = expect_error(lambda: run.client().register_schema(s, v3_incompatible), 409, 409)
        ensure("BACKWARD" in e.error_message, f"message does not name the level: {e}")

    run.check("register an incompatible schema: 409", incompatible_registration)

    def subject_config():
        client = run.client()
        expect_error(lambda: client.get_compatibility(s), 404, 40408)
        equal(client.set_compatibility(s, "NONE"), {"compatibility": "NONE"}, "PUT /config/s")
        equal(run.client().get_compatibility(s), "NONE", "subject level")
        equal(run.client().get_compatibility(), "BACKWARD", "the global level is unchanged")
        ids["v3"] = run.client().register_schema(s, v3_incompatible)
        equal(run.client().get_latest_version(s).version, 3, "version under NONE")
        deleted = run.client().delete_config(s)
        equal(deleted.compatibility_level, "NONE", "delete_config answer")
        expect_error(lambda: run.client().get_compatibility(s), 404, 40408)
        expect_error(lambda: client.set_compatibility(s, "SIDEWAYS"), 422, 42203)
        expect_error(lambda: client.set_compatibility(level="SIDEWAYS"), 422, 42203)

    run.check("set_compatibility / get_compatibility / delete_config (subject)", subject_config)

    # --- errors ------------------------------------------------------------------------------
    def not_found_errors():
        missing = run.subject("missing")
        expect_error(lambda: run.client().get_versions(missing), 404, 40401)
        expect_error(lambda: run.client().get_latest_version(missing), 404, 40401)
        expect_error(lambda: run.client().lookup_schema(missing, v1), 404, 40401)
        expect_error(lambda: run.client().delete_subject(missing), 404, 40401)
        expect_error(lambda: run.client().get_version(s, 99), 404, 40402)
        expect_error(lambda: run.client().delete_version(s, 99), 404, 40402)
        expect_error(lambda: run.client().get_schema(2**31 - 1), 404, 40403)
        expect_error(lambda: run.client().lookup_schema(s, never_registered), 404, 40403)

    run.check("not found: 40401 subject, 40402 version, 40403 schema", not_found_errors)

    def invalid_errors():
        expect_error(lambda: run.client().register_schema(s, Schema("{not json", "AVRO")),
                     422, 42201)
        no_fields = json.dumps({"type": "record", "name": "Broken"})
        expect_error(lambda: run.client().register_schema(s, Schema(no_fields, "AVRO")),
                     422, 42201)
        expect_error(lambda: run.client().get_version(s, "zero"), 422, 42202)

    run.check("invalid: 42201 schema, 42202 version", invalid_errors)

    def http_errors():
        expect_confluent_error(run.raw("GET", "/no/such/route"), 404, 404)
        expect_confluent_error(run.raw("PUT", "/subjects", {}), 405, 405)
        expect_confluent_error(run.raw("DELETE", "/schemas/ids/1"), 405, 405)
        # JAX-RS answers a path parameter of the wrong type as a route that does not exist.
        expect_confluent_error(run.raw("GET", "/schemas/ids/not-a-number"), 404, 404)

    run.check("HTTP-level errors are Confluent JSON too (404, 405)", http_errors)

    # --- Avro serde through the registry ------------------------------------------------------
    def avro_serde():
        topic = f"{run.prefix}-events"
        run.subjects.add(f"{topic}-value")
        serializer = AvroSerializer(run.client(), v2.schema_str)
        ctx = SerializationContext(topic, MessageField.VALUE)
        value = {"id": "u-1", "nick": "Ada"}
        data = serializer(value, ctx)
        equal(data[0], 0, "the wire format's magic byte")
        registered = run.client().get_latest_version(f"{topic}-value")
        equal(int.from_bytes(data[1:5], "big"), registered.schema_id,
              "the schema id in the message")
        # A deserializer with empty caches fetches the writer's schema by id.
        equal(AvroDeserializer(run.client())(data, ctx), value, "decoded value")
        # And reads it into a newer reader schema, filling the default.
        reader = run.record(
            "User",
            [
                {"name": "id", "type": "string"},
                {"name": "nick", "type": ["null", "string"], "default": None},
                {"name": "team", "type": "string", "default": "none"},
            ],
        )
        equal(AvroDeserializer(run.client(), reader)(data, ctx),
              {"id": "u-1", "nick": "Ada", "team": "none"}, "decoded with a reader schema")
        # Without auto-registration, the serializer looks the schema up: 40403 for a new one.
        strict = AvroSerializer(run.client(), never_registered.schema_str,
                                conf={"auto.register.schemas": False})
        try:
            strict({"x": 1}, ctx)
        except Exception as e:  # noqa: BLE001 - the serde wraps the registry's error
            ensure("40403" in str(e) or "not found" in str(e).lower(),
                   f"unexpected error for an unregistered schema: {e}")
        else:
            raise Failed("serializing with an unregistered schema and no auto-registration worked")

    run.check("AvroSerializer / AvroDeserializer", avro_serde)

    # --- deletes -----------------------------------------------------------------------------
    def delete_version():
        client = run.client()
        equal(client.delete_version(s, 1), 1, "soft delete of version 1")
        equal(run.client().get_versions(s), [2, 3], "live versions")
        equal(run.client().get_versions(s, deleted=True), [1, 2, 3], "versions with deleted")
        expect_error(lambda: run.client().get_version(s, 1), 404, 40402)
        equal(run.client().get_version(s, 1, deleted=True).schema_id, ids["v1"],
              "a soft-deleted version, asked for with deleted=true")
        # The schema id stays: records written with it still decode.
        equal(json.loads(run.client().get_schema(ids["v1"]).schema_str),
              json.loads(v1.schema_str), "schema by id after a soft delete")
        expect_error(lambda: run.client().delete_version(s, 1), 404, 40406)
        expect_error(lambda: run.client().delete_version(s, 2, permanent=True), 404, 40407)
        equal(run.client().delete_version(s, 1, permanent=True), 1, "hard delete of version 1")
        equal(run.client().get_versions(s, deleted=True), [2, 3], "versions after hard delete")
        expect_error(lambda: run.client().delete_version(s, 1, permanent=True), 404, 40402)

    run.check("delete_version: soft, then permanent (40402, 40406, 40407)", delete_version)

    def delete_subject():
        client = run.client()
        client.set_compatibility(s, "FORWARD")
        expect_error(lambda: client.delete_subject(s, permanent=True), 404, 40405)
        equal(client.delete_subject(s), [2, 3], "soft delete of the subject")
        ensure(s not in run.client().get_subjects(), "a soft-deleted subject is listed")
        ensure(s in run.client().get_subjects(deleted=True),
               "a soft-deleted subject is missing from deleted=true")
        expect_error(lambda: run.client().get_versions(s), 404, 40401)
        equal(run.client().get_versions(s, deleted=True), [2, 3], "its versions, deleted=true")
        # Deleting a subject deletes its compatibility level too.
        expect_error(lambda: run.client().get_compatibility(s), 404, 40408)
        expect_error(lambda: run.client().delete_subject(s), 404, 40404)
        equal(run.client().delete_subject(s, permanent=True), [2, 3], "hard delete")
        ensure(s not in run.client().get_subjects(deleted=True),
               "a hard-deleted subject is still listed with deleted=true")
        expect_error(lambda: run.client().get_versions(s, deleted=True), 404, 40401)
        expect_error(lambda: run.client().delete_subject(s, permanent=True), 404, 40401)
        # v3 was only ever under this subject: its id is gone; v1 is still under `other`.
        expect_error(lambda: run.client().get_schema(ids["v3"]), 404, 40403)
        equal(run.client().get_schema(ids["v1"]).schema_type, "AVRO", "v1 is still in use")
        # Registering again starts a new history.
        run.client().register_schema(s, v1)
        equal(run.client().get_versions(s), [1], "versions after re-creating the subject")

    run.check("delete_subject: soft, then permanent (40401, 40404, 40405)", delete_subject)

    def restore_global():
        run.client().set_compatibility(level=run.original_global)
        equal(run.client().get_compatibility(), run.original_global, "the global level put back")
        run.original_global = None

    run.check("global level put back", restore_global)
    run.cleanup()
    print(f"{len(run.passed)} passed, {len(run.failed)} failed")
    if run.failed:
        sys.exit(1)


if __name__ == "__main__":
    args = sys.argv[1:]
    keep_going = "--keep-going" in args
    args = [a for a in args if a != "--keep-going"]
    if len(args) != 1:
        print(f"usage: {sys.argv[0]} [--keep-going] REGISTRY_URL", file=sys.stderr)
        sys.exit(2)
    main(args[0], keep_going)
