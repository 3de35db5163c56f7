#!/usr/bin/env python3
"""Check that schemas/pool.schema.json and vmpool agree on the fixture corpus.

Usage:
    python3 scripts/check-schema.py [--vmpool PATH_TO_VMPOOL_BINARY]
                                    [--fixtures Tests/Fixtures/manifests]

Fixture folders and what is expected of each file in them:
    valid/        the schema accepts and vmpool accepts
    invalid/      the schema rejects and vmpool rejects
    cross-field/  the schema accepts and vmpool rejects (rules JSON Schema
                  cannot express: maxMemory >= memory across units, unique
                  metadata.name across the documents of a file, unique disk
                  names within a pool, no host bits in spec.network.subnet,
                  a subnet with room for size + warm + 1 VMs, no host bits
                  in spec.network.egress rules and no rule repeated in
                  another spelling; see scripts/gen-schema.py)

Every file in invalid/ and cross-field/ must start with a line
"# expect: <field path> <short reason>".

Without --vmpool only the schema side is checked.

Also checked: schemas/pool.schema.json equals the output of
scripts/gen-schema.py, and is itself a valid draft 2020-12 schema.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:
    yaml = None

try:
    import jsonschema
except ImportError:
    jsonschema = None


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_PATH = os.path.join(REPO_ROOT, "schemas", "pool.schema.json")
GENERATOR_PATH = os.path.join(REPO_ROOT, "scripts", "gen-schema.py")
DEFAULT_FIXTURES = os.path.join("Tests", "Fixtures", "manifests")

ACCEPT = "accept"
REJECT = "reject"

# folder -> (expected schema verdict, expected vmpool verdict)
EXPECTATIONS = {
    "valid": (ACCEPT, ACCEPT),
    "invalid": (REJECT, REJECT),
    "cross-field": (ACCEPT, REJECT),
}
HEADER_REQUIRED = {"invalid", "cross-field"}
EXPECT_HEADER = re.compile(r"^# expect: \S+ \S.*$")

VMPOOL_TIMEOUT_SECONDS = 60


def require_dependencies():
    missing = []
    if yaml is None:
        missing.append("PyYAML")
    if jsonschema is None:
        missing.append("jsonschema")
    if missing:
        names = " ".join(missing)
        sys.stderr.write(
            f"check-schema: missing Python package(s): {names}\n"
            f"install them with: python3 -m pip install {names}\n"
        )
        sys.exit(2)


# --------------------------------------------------------------------------
# YAML loading


def make_unique_key_loader():
    """A SafeLoader subclass that rejects duplicate mapping keys.

    Keys are compared after construction, so `team` and `"team"`, or `1`
    and `0x1`, are duplicates of each other.
    """

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:
                        continue  # the base class reports unhashable keys
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"found duplicate key {key!r} "
                            f"(first defined {seen[key]})",
                            key_node.start_mark,
                        )
                    seen[key] = str(key_node.start_mark).strip()
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_documents(path, loader):
    """Return the non-null documents of a file; raise yaml.YAMLError."""
    with open(path, "rb") as stream:
        documents = list(yaml.load_all(stream, Loader=loader))
    return [document for document in documents if document is not None]


# --------------------------------------------------------------------------
# Verdicts


def schema_verdict(path, loader, validator):
    """Return (verdict, detail) for one fixture file."""
    try:
        documents = load_documents(path, loader)
    except yaml.YAMLError as error:
        summary = " ".join(str(error).split())
        if len(summary) > 120:
            summary = summary[:117] + "..."
        return REJECT, f"YAML error: {summary}"
    for index, document in enumerate(documents, start=1):
        error = jsonschema.exceptions.best_match(
            validator.iter_errors(document)
        )
        if error is not None:
            location = ".".join(str(part) for part in error.absolute_path)
            message = error.message
            if len(message) > 80:
                message = message[:77] + "..."
            return REJECT, f"document {index}: {location or '<root>'}: {message}"
    return ACCEPT, f"{len(documents)} document(s)"


def error_line_pattern(file_arg):
    return re.compile(
        r"^" + re.escape(file_arg) + r":[1-9][0-9]*:[1-9][0-9]*: (.+?): (.+)$"
    )


def reports_error(line, file_arg):
    """Whether a stderr line is an error report (and so must be formatted)."""
    return line.startswith(file_arg + ":") or line.lower().startswith("error")


def vmpool_verdict(binary, file_arg):
    """Run `vmpool validate` on one file; return (verdict, problems, detail).

    problems lists contract violations of the run itself (bad exit code,
    badly formatted error lines, files written to the state dir).
    """
    problems = []
    with tempfile.TemporaryDirectory(prefix="vmpool-check-") as state_dir:
        # The schema judges documents, not the files they name: vmpool's checks of image
        # files on this machine stay out of the comparison.
        command = [binary, "validate", "--documents-only", "--state-dir", state_dir, "-f", file_arg]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=VMPOOL_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            return None, [f"timed out after {VMPOOL_TIMEOUT_SECONDS}s"], ""
        except OSError as error:
            return None, [f"cannot run {binary}: {error}"], ""

        leftovers = sorted(os.listdir(state_dir))
        if leftovers:
            problems.append(f"state dir not empty: {', '.join(leftovers)}")

    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    first_stderr = stderr_lines[0] if stderr_lines else ""

    if result.returncode == 0:
        return ACCEPT, problems, first_stderr
    if result.returncode != 1:
        problems.append(f"exit code {result.returncode} (want 0 or 1)")
        return None, problems, first_stderr

    pattern = error_line_pattern(file_arg)
    error_lines = [line for line in stderr_lines if reports_error(line, file_arg)]
    if not error_lines:
        problems.append("rejected without an error line on stderr")
    for line in error_lines:
        if not pattern.match(line):
            problems.append(f"badly formatted error line: {line!r}")
    return REJECT, problems, first_stderr


# --------------------------------------------------------------------------
# Schema file checks


def check_schema_file():
    """Return (schema, problems)."""
    problems = []
    try:
        with open(SCHEMA_PATH, encoding="utf-8") as handle:
            checked_in = handle.read()
    except OSError as error:
        return None, [f"cannot read {SCHEMA_PATH}: {error}"]

    generated = subprocess.run(
        [sys.executable, GENERATOR_PATH], capture_output=True, text=True
    )
    if generated.returncode != 0:
        problems.append(f"scripts/gen-schema.py failed: {generated.stderr.strip()}")
    elif generated.stdout != checked_in:
        problems.append(
            "schemas/pool.schema.json differs from the output of "
            "scripts/gen-schema.py (regenerate it: "
            "python3 scripts/gen-schema.py > schemas/pool.schema.json)"
        )

    try:
        schema = json.loads(checked_in)
    except ValueError as error:
        return None, problems + [f"schemas/pool.schema.json is not JSON: {error}"]
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        return None, problems + [f"not a valid 2020-12 schema: {error.message}"]
    return schema, problems


# --------------------------------------------------------------------------
# Fixtures


def list_fixtures(fixtures_dir):
    """Return [(folder, path)] for every fixture, in a stable order."""
    fixtures = []
    for folder in EXPECTATIONS:
        directory = os.path.join(fixtures_dir, folder)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if name.endswith(".yaml"):
                fixtures.append((folder, os.path.join(directory, name)))
    return fixtures


def header_problem(folder, path):
    if folder not in HEADER_REQUIRED:
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        first_line = handle.readline().rstrip("\r\n")
    if not EXPECT_HEADER.match(first_line):
        return "first line is not '# expect: <field path> <reason>'"
    return None


def check_fixture(folder, path, loader, validator, binary):
    """Return a disagreement row (dict) or None."""
    want_schema, want_vmpool = EXPECTATIONS[folder]
    row = {
        "fixture": os.path.join(folder, os.path.basename(path)),
        "expected": f"schema {want_schema}, vmpool {want_vmpool}",
        "schema": "-",
        "vmpool": "-",
        "problems": [],
    }

    problem = header_problem(folder, path)
    if problem:
        row["problems"].append(problem)

    got_schema, schema_detail = schema_verdict(path, loader, validator)
    row["schema"] = got_schema
    if got_schema != want_schema:
        row["problems"].append(f"schema: {schema_detail}")

    if binary is not None:
        got_vmpool, run_problems, vmpool_detail = vmpool_verdict(binary, path)
        row["vmpool"] = got_vmpool or "error"
        row["problems"].extend(f"vmpool: {p}" for p in run_problems)
        if got_vmpool is not None and got_vmpool != want_vmpool:
            detail = vmpool_detail or "(no stderr)"
            row["problems"].append(f"vmpool: {detail}")

    return row if row["problems"] else None


def print_table(rows):
    headers = ("fixture", "expected", "schema", "vmpool")
    widths = [
        max(len(headers[i]), *(len(row[headers[i]]) for row in rows))
        for i in range(len(headers))
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(row[h].ljust(w) for h, w in zip(headers, widths)))
        for problem in row["problems"]:
            print(f"    {problem}")


# --------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=(
            "Check that schemas/pool.schema.json and vmpool agree on the "
            "manifest fixture corpus."
        )
    )
    parser.add_argument(
        "--vmpool",
        metavar="PATH",
        help="vmpool binary; without it only the schema side is checked",
    )
    parser.add_argument(
        "--fixtures",
        metavar="DIR",
        default=DEFAULT_FIXTURES,
        help=f"fixture root with valid/, invalid/, cross-field/ "
        f"(default: {DEFAULT_FIXTURES})",
    )
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    require_dependencies()

    if args.vmpool is not None and not os.access(args.vmpool, os.X_OK):
        sys.stderr.write(f"check-schema: not an executable: {args.vmpool}\n")
        return 2
    if not os.path.isdir(args.fixtures):
        sys.stderr.write(f"check-schema: no fixture directory: {args.fixtures}\n")
        return 2

    schema, schema_problems = check_schema_file()
    for problem in schema_problems:
        print(f"schema file: {problem}")
    if schema is None:
        return 1

    validator = jsonschema.Draft202012Validator(schema)  # no format checker
    loader = make_unique_key_loader()
    fixtures = list_fixtures(args.fixtures)
    if not fixtures:
        print(f"no fixtures under {args.fixtures}")
        return 1

    rows = []
    for folder, path in fixtures:
        row = check_fixture(folder, path, loader, validator, args.vmpool)
        if row is not None:
            rows.append(row)

    if rows:
        print_table(rows)
        print(
            f"schema agreement: {len(fixtures)} fixtures, "
            f"{len(rows)} disagreements"
        )
        return 1
    if schema_problems:
        return 1

    if args.vmpool is None:
        print("vmpool not given (--vmpool): checked the schema side only")
    print(f"schema agreement: {len(fixtures)} fixtures, 0 disagreements")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
