#!/usr/bin/env python3
"""Print the JSON Schema (draft 2020-12) for one vmpool manifest document.

Usage:
    python3 scripts/gen-schema.py > schemas/pool.schema.json

The checked-in schemas/pool.schema.json must be byte-for-byte equal to the
output of this script; scripts/check-schema.py verifies that.

The schema covers one YAML document of kind Pool. Seven rules of the manifest
format cannot be expressed here (or not reasonably) and are enforced by
vmpool only:
  * spec.maxMemory >= spec.memory (the two quantities may use different
    units, e.g. 2Gi vs 1024Mi);
  * metadata.name is unique among the documents of one file;
  * spec.disks[].name is unique among the disks of one pool (uniqueItems
    compares whole disks, not one of their fields);
  * spec.network.subnet has no host bits set (10.77.0.1/24 is refused);
    a pattern would need a regex over the bits of every octet for each of
    the 22 prefix lengths;
  * spec.network.subnet has room for the pool: 2^(32 - prefix) - 3
    addresses for VMs (network, broadcast and the bridge's own address
    excluded) >= spec.size + spec.warm + 1 (one spare for a replacement);
    JSON Schema cannot add two fields;
  * spec.network.egress rules have no host bits set (10.20.0.1/16 is
    refused), for the same reason as the subnet's, over 32 IPv4 and 128
    IPv6 prefix lengths;
  * spec.network.egress rules are not repeated in another spelling
    (2001:db8::/32 and 2001:DB8:0::/32 are one rule): uniqueItems compares
    the text.
Their fixtures live in Tests/Fixtures/manifests/cross-field/.
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

MAX_DISKS = 16
MIN_DISK_MIB = 1
MAX_DISK_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_PORTS = 32
MIN_PORT = 1
MAX_PORT = 65535
MAX_EGRESS_RULES = 64
MIN_IO_WEIGHT = 1
MAX_IO_WEIGHT = 10000
MAX_CPU_PERCENT = 100

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
NO_CONTROL_CHARS_PATTERN = r"^[^\u0000-\u001f\u007f]*$"
MEBIBYTES_PATTERN = r"^(6[4-9]|[7-9][0-9]|[1-9][0-9]{2,6})Mi$"
GIBIBYTES_PATTERN = r"^[1-9][0-9]{0,3}Gi$"
DISK_NAME_PATTERN = r"^[a-z0-9-]{1,32}$"
INTERFACE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,15}$"

NO_TRAILING_NEWLINE_REF = {"$ref": "#/$defs/noTrailingNewline"}


def digit_range(low, high):
    """A regex for one digit from low to high."""
    if low == high:
        return str(low)
    return f"[{low}-{high}]"


def any_digits(count):
    """A regex for exactly count digits."""
    if count == 0:
        return ""
    if count == 1:
        return "[0-9]"
    return f"[0-9]{{{count}}}"


def decimal_up_to(limit):
    """An unanchored regex group for the decimal numbers 1..limit.

    No sign, no leading zeros. Shorter numbers first, then one alternative
    per digit of limit: the digits of limit before it, a smaller digit (or
    an equal one for the last digit), then any digits.
    """
    digits = [int(d) for d in str(limit)]
    width = len(digits)
    alternatives = []
    if width > 1:
        shorter = "[1-9]" if width == 2 else f"[1-9][0-9]{{0,{width - 2}}}"
        alternatives.append(shorter)
    for index, digit in enumerate(digits):
        low = 1 if index == 0 else 0
        last = index == width - 1
        high = digit if last else digit - 1
        if high < low:
            continue
        alternatives.append(
            str(limit)[:index]
            + digit_range(low, high)
            + any_digits(width - index - 1)
        )
    return "(" + "|".join(alternatives) + ")"


DISK_MEBIBYTES_PATTERN = f"^{decimal_up_to(MAX_DISK_MIB)}Mi$"
DISK_GIBIBYTES_PATTERN = f"^{decimal_up_to(MAX_DISK_MIB // 1024)}Gi$"
DISK_TEBIBYTES_PATTERN = f"^{decimal_up_to(MAX_DISK_MIB // 1024 // 1024)}Ti$"

OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9][0-9]|[0-9])"
SUBNET_PREFIX = r"([89]|1[0-9]|2[0-9])"  # 8..29
SUBNET_PATTERN = rf"^({OCTET}\.){{3}}{OCTET}/{SUBNET_PREFIX}$"

IPV4_ADDRESS = rf"({OCTET}\.){{3}}{OCTET}"
IPV4_PREFIX = r"(3[0-2]|[12][0-9]|[0-9])"  # 0..32
HEXTET = r"[0-9A-Fa-f]{1,4}"
# Eight hex groups, or fewer around one '::' (no zone, no dotted IPv4 tail).
IPV6_ADDRESS = (
    "("
    + "|".join(
        [
            rf"({HEXTET}:){{7}}{HEXTET}",
            rf"({HEXTET}:){{1,7}}:",
            rf"({HEXTET}:){{1,6}}:{HEXTET}",
            rf"({HEXTET}:){{1,5}}(:{HEXTET}){{1,2}}",
            rf"({HEXTET}:){{1,4}}(:{HEXTET}){{1,3}}",
            rf"({HEXTET}:){{1,3}}(:{HEXTET}){{1,4}}",
            rf"({HEXTET}:){{1,2}}(:{HEXTET}){{1,5}}",
            rf"{HEXTET}:(:{HEXTET}){{1,6}}",
            rf":((:{HEXTET}){{1,7}}|:)",
        ]
    )
    + ")"
)
IPV6_PREFIX = r"(12[0-8]|1[01][0-9]|[1-9][0-9]|[0-9])"  # 0..128
PORT = decimal_up_to(MAX_PORT)
IPV4_CIDR = rf"{IPV4_ADDRESS}/{IPV4_PREFIX}"
IPV6_CIDR = rf"{IPV6_ADDRESS}/{IPV6_PREFIX}"
# a.b.c.d/p[:PORT], an IPv6 network bare, or an IPv6 network with a port in brackets.
EGRESS_RULE_PATTERN = rf"^({IPV4_CIDR}(:{PORT})?|{IPV6_CIDR}|\[{IPV6_CIDR}\]:{PORT})$"
CPU_PERCENT_PATTERN = rf"^{decimal_up_to(MAX_CPU_PERCENT)}%$"


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
        "diskSize": {
            "description": (
                "Disk size, 1 MiB to 64 TiB. An integer number of MiB "
                "(1..67108864), or a string with a binary suffix: "
                "1Mi..67108864Mi, 1Gi..65536Gi or 1Ti..64Ti. No other "
                "suffixes, no spaces, no leading zeros, no bare numeric "
                "strings."
            ),
            "anyOf": [
                integer("Disk size in MiB.", MIN_DISK_MIB, MAX_DISK_MIB),
                anchored_string(
                    DISK_MEBIBYTES_PATTERN, "Disk size in MiB, e.g. 512Mi."
                ),
                anchored_string(
                    DISK_GIBIBYTES_PATTERN, "Disk size in GiB, e.g. 4Gi."
                ),
                anchored_string(
                    DISK_TEBIBYTES_PATTERN, "Disk size in TiB, e.g. 1Ti."
                ),
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
        "description": (
            "Boot image of the pool's VMs. Without kernel, the default "
            "guest image's kernel and initrd boot with this cmdline (e.g. "
            "root=/dev/vda for a root disk)."
        ),
        "type": "object",
        "additionalProperties": False,
        "dependentRequired": {"initrd": ["kernel"]},
        "properties": {
            "kernel": {
                "description": "Path of the kernel image (default: the default guest image's).",
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


def disks_schema():
    return {
        "description": (
            "Virtio disks of every VM, in this order (vda, vdb, ...). Disk "
            "names are unique within the pool (checked by vmpool, not by "
            "this schema)."
        ),
        "type": "array",
        "maxItems": MAX_DISKS,
        "items": {
            "description": (
                "One disk: a copy-on-write overlay of a base image, or an "
                "empty disk of the given size."
            ),
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": anchored_string(
                    DISK_NAME_PATTERN,
                    (
                        "Disk name: 1..32 lowercase letters, digits and "
                        "'-'. Unique within the pool."
                    ),
                ),
                "image": {
                    "description": (
                        "Base image (qcow2 or raw), never written. Relative "
                        "paths are relative to the manifest's directory."
                    ),
                    "$ref": "#/$defs/path",
                },
                "size": {
                    "description": (
                        "Virtual size of the VM's disk; at least the image's. "
                        "Required without an image."
                    ),
                    "$ref": "#/$defs/diskSize",
                },
            },
            "if": {"not": {"required": ["image"]}},
            "then": {"required": ["size"]},
        },
    }


def bridge_schema():
    schema = anchored_string(
        INTERFACE_NAME_PATTERN,
        (
            "Linux bridge vmpool creates and uses: 1..15 letters, digits, "
            "'_', '.' and '-', but not '.' or '..'. Default vmpool0. Mode "
            "bridge only."
        ),
    )
    schema["not"] = {"enum": [".", ".."]}
    return schema


def egress_schema():
    return {
        "description": (
            "Where the VMs may connect to, besides what is always walled "
            "off (the host, link-local addresses, other pools): all (the "
            "default), none, or a list of 1..64 rules. A rule is an IPv4 "
            "network a.b.c.d/p (p 0..32) or an IPv6 network (p 0..128), "
            "optionally with :PORT (1..65535); an IPv6 network with a port "
            "is written in brackets: [2001:db8::/32]:443. No host bits set "
            "and no rule twice, also in another spelling (both checked by "
            "vmpool, not by this schema). Modes user and bridge only; "
            "changed in place."
        ),
        "anyOf": [
            {"enum": ["all", "none"]},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_EGRESS_RULES,
                "uniqueItems": True,
                "items": anchored_string(
                    EGRESS_RULE_PATTERN,
                    (
                        "A network in CIDR form, optionally with a port: "
                        "10.20.0.0/16, 192.0.2.7/32:443, 2001:db8::/32, "
                        "[2001:db8::/32]:443."
                    ),
                ),
            },
        ],
    }


def network_schema():
    mode_is_bridge = {
        "properties": {"mode": {"const": "bridge"}},
        "required": ["mode"],
    }
    mode_is_none = {
        "properties": {"mode": {"const": "none"}},
        "required": ["mode"],
    }
    mode_is_not_user = {
        "properties": {"mode": {"not": {"const": "user"}}},
        "required": ["mode"],
    }
    return {
        "description": (
            "How the pool's VMs reach and are reached. Once network is "
            "given, mode defaults to user."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "mode": {
                "description": (
                    "user (the default): QEMU user networking with forwarded "
                    "ports; bridge: a tap per VM on a Linux bridge, an "
                    "address per VM from subnet; none: no NIC."
                ),
                "enum": ["user", "bridge", "none"],
            },
            "ports": {
                "description": (
                    "Guest TCP ports, each forwarded from a free port on "
                    "127.0.0.1. Mode user only."
                ),
                "type": "array",
                "maxItems": MAX_PORTS,
                "uniqueItems": True,
                "items": integer("Guest TCP port.", MIN_PORT, MAX_PORT),
            },
            "bridge": bridge_schema(),
            "subnet": anchored_string(
                SUBNET_PATTERN,
                (
                    "IPv4 network the VMs' addresses come from, in CIDR "
                    "form with a prefix of 8..29, e.g. 10.77.0.0/24. No "
                    "host bits set, and at least size + warm + 1 addresses "
                    "for VMs besides network, broadcast and the bridge's "
                    "own (both checked by vmpool, not by this schema). "
                    "Mode bridge only, and required there."
                ),
            ),
            "egress": egress_schema(),
            "isolate": {
                "description": (
                    "In bridge mode, the VMs do not reach each other either "
                    "(they never reach other pools). Default false. Modes "
                    "user and bridge only; changed in place."
                ),
                "type": "boolean",
            },
        },
        "allOf": [
            {
                "if": mode_is_not_user,
                "then": {"properties": {"ports": False}},
            },
            {
                "if": mode_is_bridge,
                "then": {"required": ["subnet"]},
                "else": {"properties": {"bridge": False, "subnet": False}},
            },
            {
                "if": mode_is_none,
                "then": {"properties": {"egress": False, "isolate": False}},
            },
        ],
    }


def limits_schema():
    return {
        "description": (
            "Lowers the per-VM resource limits; changed in place, VMs are "
            "not replaced."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "cpu": anchored_string(
                CPU_PERCENT_PATTERN,
                (
                    "Share of the VM's vCPUs its QEMU may use: 1% to 100%, "
                    "an integer followed by %."
                ),
            ),
            "ioWeight": integer(
                "cgroup v2 io.weight of the VM's QEMU.",
                MIN_IO_WEIGHT,
                MAX_IO_WEIGHT,
            ),
        },
    }


MAX_TEMPLATE_FILES = 64
MAX_SETUP_STEPS = 64
MAX_STEP_ARGUMENTS = 256
MAX_STEP_TEXT = 16384
# A whole number of seconds (1..3600), minutes (1..60) or hours (1).
READY_TIMEOUT_PATTERN = (
    "^(([1-9][0-9]{0,2}|[1-2][0-9]{3}|3[0-5][0-9]{2}|3600)s"
    "|([1-9]|[1-5][0-9]|60)m|1h)$"
)
NO_NUL_PATTERN = r"^[^\u0000]*$"
GUEST_PATH_PATTERN = r"^/[^\u0000-\u001f\u007f]+$"


def setup_step(description):
    return {
        "description": description,
        "oneOf": [
            {
                "description": "A shell line, run under /bin/sh -c.",
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_STEP_TEXT,
                "pattern": NO_NUL_PATTERN,
            },
            {
                "description": "An argument vector (strings; quote numbers).",
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_STEP_ARGUMENTS,
                "prefixItems": [
                    {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_STEP_TEXT,
                        "pattern": NO_NUL_PATTERN,
                    }
                ],
                "items": {
                    "type": "string",
                    "maxLength": MAX_STEP_TEXT,
                    "pattern": NO_NUL_PATTERN,
                },
            },
        ],
    }


def template_schema():
    return {
        "description": (
            "How the pool's VMs are prepared (files, setup, ready: in the "
            "template VM before its memory is saved, or in each VM that "
            "boots cold) and how the template serves its clones "
            "(shareMemory: boot: template only)."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "shareMemory": {
                "description": (
                    "Clones map the template's memory copy-on-write (true, "
                    "the default); false gives each clone a private copy. "
                    "A change replaces the clones, not the template."
                ),
                "type": "boolean",
            },
            "files": {
                "description": (
                    "Host files or directories copied into the VM first, in "
                    "order. A change of path or content rebuilds the "
                    "template and replaces the VMs."
                ),
                "type": "array",
                "maxItems": MAX_TEMPLATE_FILES,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["src", "dst"],
                    "properties": {
                        "src": {
                            "description": "Host path, relative to the manifest.",
                            "$ref": "#/$defs/path",
                        },
                        "dst": {
                            "description": (
                                "Absolute guest path (not /), no control "
                                "characters; its parents are made."
                            ),
                            "type": "string",
                            "maxLength": 4096,
                            "pattern": GUEST_PATH_PATTERN,
                        },
                    },
                },
            },
            "setup": {
                "description": "Commands run in order in the VM; each must exit 0.",
                "type": "array",
                "maxItems": MAX_SETUP_STEPS,
                "items": setup_step("One setup step."),
            },
            "ready": {
                "description": (
                    "Must hold before the template's memory is saved, and in "
                    "each VM before it counts as ready."
                ),
                "type": "object",
                "additionalProperties": False,
                "anyOf": [{"required": ["exec"]}, {"required": ["port"]}],
                "properties": {
                    "exec": setup_step("A command that exits 0 once the VM is ready."),
                    "port": {
                        "description": "A guest TCP port something listens on.",
                        "type": "integer",
                        "minimum": MIN_PORT,
                        "maximum": MAX_PORT,
                    },
                    "timeout": {
                        "description": "How long the check may take to hold (default 5m): 1s to 60m.",
                        "type": "string",
                        "pattern": READY_TIMEOUT_PATTERN,
                    },
                },
            },
        },
    }


def template_only_with_boot_template():
    """shareMemory is for boot: template; files, setup and ready are not."""
    return {
        "if": {
            "properties": {"boot": {"const": "template"}},
            "required": ["boot"],
        },
        "else": {
            "properties": {
                "template": {"properties": {"shareMemory": False}}
            }
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
            "disks": disks_schema(),
            "network": network_schema(),
            "placement": {
                "description": (
                    "How VMs are placed on the hosts sharing one store: "
                    "spread (the default) evens them out, pack fills as "
                    "few hosts as fit."
                ),
                "enum": ["spread", "pack"],
            },
            "limits": limits_schema(),
            "template": template_schema(),
        },
        "allOf": vcpus_within_max_vcpus() + [template_only_with_boot_template()],
    }


def pool_schema():
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "$comment": (
            "Generated by scripts/gen-schema.py; do not edit by hand. "
            "Not expressible here, enforced by vmpool only: "
            "spec.maxMemory >= spec.memory, metadata.name unique "
            "within a file, spec.disks[].name unique within a pool, "
            "spec.network.subnet without host bits set and with at least "
            "spec.size + spec.warm + 1 addresses for VMs, "
            "spec.network.egress rules without host bits set and not "
            "repeated in another spelling."
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
