#!/usr/bin/env python3
"""Print the JSON Schema (draft 2020-12) for one vmpool manifest document.

Usage:
    python3 scripts/gen-schema.py > schemas/pool.schema.json

The checked-in schemas/pool.schema.json must be byte-for-byte equal to the
output of this script; scripts/check-schema.py verifies that.

The schema covers one YAML document of kind Pool. Two rules of the manifest
format cannot be expressed here and are enforced by vmpool only:
  * spec.maxMemory >= spec.memory (the two quantities may use different
    units, e.g. 2Gi vs 1024Mi);
  * metadata.name is unique among the documents of one file.
"""

import json
import sys

SCHEMA_ID = "urn:vmpool:schema:pool:v1"

API_VERSION = "vmpool/v1"
KIND = "Pool"

MIN_VCPUS = 1
MAX_VCPUS = 64
MAX_SIZE = 1000
MAX_WARM = 1000

MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 9999999

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
NO_CONTROL_CHARS_PATTERN = r"^[^\u0000-\u001f\u007f]*$"
MEBIBYTES_PATTERN = r"^(6[4-9]|[7-9][0-9]|[1-9][0-9]{2,6})Mi$"
GIBIBYTES_PATTERN = r"^[1-9][0-9]{0,3}Gi$"

NO_TRAILING_NEWLINE_REF = {"$ref": "#/$defs/noTrailingNewline"}


def anchored_string(pattern, description, **extra):
    """A string that must match an anchored pattern.

    The reference to noTrailingNewline keeps the '$' anchor strict for
    validators whose regex engine also lets '$' match before a final newline.
    """
    schema = {
        "description": description,
        "type": "string",
        "pattern": pattern,
    }
    schema.update(extra)
    schema.update(NO_TRAILING_NEWLINE_REF)
    return schema


def integer(description, minimum, maximum):
    return {
        "description": description,
        "type": "integer",
        "minimum": minimum,
        "maximum": maximum,
    }


def defs():
    return {
        "noTrailingNewline": {
            "description": (
                "Rejects strings ending in a newline. ECMA-262 '$' already "
                "does, but some regex engines (Python's re among them) let "
                "'$' match before a final newline."
            ),
            "not": {"type": "string", "pattern": "\\n$"},
        },
        "quantity": {
            "description": (
                "Memory size. An integer number of MiB (64..9999999), or a "
                "string with a binary suffix: 64Mi..9999999Mi or 1Gi..9999Gi. "
                "No other suffixes, no spaces, no leading zeros, no bare "
                "numeric strings."
            ),
            "anyOf": [
                integer("Memory in MiB.", MIN_MEMORY_MIB, MAX_MEMORY_MIB),
                anchored_string(MEBIBYTES_PATTERN, "Memory in MiB, e.g. 512Mi."),
                anchored_string(GIBIBYTES_PATTERN, "Memory in GiB, e.g. 2Gi."),
            ],
        },
        "path": anchored_string(
            NO_CONTROL_CHARS_PATTERN,
            "A host path: 1..4096 characters, no control characters.",
            minLength=1,
            maxLength=4096,
        ),
    }


def metadata_schema():
    return {
        "description": "Identity of the pool.",
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": anchored_string(
                NAME_PATTERN,
                (
                    "Pool name: 1..63 characters of lowercase letters, "
                    "digits and '-', starting and ending with a letter or "
                    "digit. Unique within a file."
                ),
            ),
            "labels": {
                "description": (
                    "Free-form string labels. Keys: 1..63 characters of "
                    "letters, digits, '.', '_', '/', '-', starting and ending "
                    "with a letter or digit. Values: strings of at most 256 "
                    "characters without control characters (quote values "
                    "that YAML would read as numbers, booleans or nulls)."
                ),
                "type": "object",
                "propertyNames": anchored_string(
                    LABEL_KEY_PATTERN, "Label key."
                ),
                "additionalProperties": anchored_string(
                    NO_CONTROL_CHARS_PATTERN,
                    "Label value.",
                    maxLength=256,
                ),
            },
        },
    }


def image_schema():
    return {
        "description": "Boot image of the pool's VMs.",
        "type": "object",
        "additionalProperties": False,
        "required": ["kernel"],
        "properties": {
            "kernel": {
                "description": "Path of the kernel image.",
                "$ref": "#/$defs/path",
            },
            "initrd": {
                "description": "Path of the initial ramdisk.",
                "$ref": "#/$defs/path",
            },
            "cmdline": anchored_string(
                NO_CONTROL_CHARS_PATTERN,
                (
                    "Kernel command line: 0..2048 characters, no control "
                    "characters."
                ),
                maxLength=2048,
            ),
        },
    }


def vcpus_within_max_vcpus():
    """One if/then clause per possible maxVcpus value: vcpus <= maxVcpus."""
    return [
        {
            "if": {
                "properties": {"maxVcpus": {"const": k}},
                "required": ["maxVcpus"],
            },
            "then": {"properties": {"vcpus": {"maximum": k}}},
        }
        for k in range(MIN_VCPUS, MAX_VCPUS + 1)
    ]


def spec_schema():
    return {
        "description": "Desired state of the pool.",
        "type": "object",
        "additionalProperties": False,
        "required": ["size", "vcpus", "memory"],
        "properties": {
            "size": integer("Number of VMs in the pool.", 0, MAX_SIZE),
            "vcpus": integer(
                "Virtual CPUs per VM. At most maxVcpus when that is set.",
                MIN_VCPUS,
                MAX_VCPUS,
            ),
            "memory": {
                "description": "Memory per VM.",
                "$ref": "#/$defs/quantity",
            },
            "maxVcpus": integer(
                "Upper bound for hot-plugged vCPUs; at least vcpus.",
                MIN_VCPUS,
                MAX_VCPUS,
            ),
            "maxMemory": {
                "description": (
                    "Upper bound for hot-plugged memory; at least memory "
                    "(checked by vmpool, not by this schema)."
                ),
                "$ref": "#/$defs/quantity",
            },
            "boot": {
                "description": (
                    "How VMs are started: from a snapshot template or by a "
                    "cold boot."
                ),
                "enum": ["template", "cold"],
            },
            "state": {
                "description": "Whether the pool's VMs run or are paused.",
                "enum": ["running", "paused"],
            },
            "warm": integer(
                "Number of pre-booted spare VMs kept ready.", 0, MAX_WARM
            ),
            "image": image_schema(),
        },
        "allOf": vcpus_within_max_vcpus(),
    }


def pool_schema():
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "$comment": (
            "Generated by scripts/gen-schema.py; do not edit by hand. "
            "Not expressible here, enforced by vmpool only: "
            "spec.maxMemory >= spec.memory, and metadata.name unique "
            "within a file."
        ),
        "title": "vmpool Pool manifest",
        "description": (
            "One YAML document of kind Pool. A file may hold several "
            "documents separated by '---'; null (empty) documents are skipped."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {
                "description": "Manifest format version.",
                "const": API_VERSION,
            },
            "kind": {
                "description": "Resource kind.",
                "const": KIND,
            },
            "metadata": metadata_schema(),
            "spec": spec_schema(),
        },
        "$defs": defs(),
    }


def render():
    return json.dumps(pool_schema(), indent=2, ensure_ascii=True) + "\n"


def main():
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
