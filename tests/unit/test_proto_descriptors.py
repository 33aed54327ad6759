"""The generated descriptors match the seed (proto/SEED.md): files, messages, fields, numbers, types.

One file per seed section, package ``events``, fields numbered 1, 2, 3 … in the seed's order,
``repeated *Entry`` of two strings as ``map<string, string>``, names exactly as in the seed.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

import pytest
from google.protobuf import descriptor_pb2

from indexer.events import core_pb2, engine_pb2, example_event_pb2, mention_notification_pb2
from tests.support.process import ROOT

SEED = ROOT / "proto" / "SEED.md"  # the events protocol as given, verbatim
# Named here, not taken from the code, so a module the code forgot still fails this test.
SEED_FILES = ("authentication", "core", "engine", "example_event", "job", "mention_notification",
              "notification", "task", "trigger")
MODULES = tuple(importlib.import_module(f"indexer.events.{name}_pb2") for name in SEED_FILES)

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "double": FDP.TYPE_DOUBLE,
    "float": FDP.TYPE_FLOAT,
    "int32": FDP.TYPE_INT32,
    "int64": FDP.TYPE_INT64,
    "uint32": FDP.TYPE_UINT32,
    "uint64": FDP.TYPE_UINT64,
    "sint32": FDP.TYPE_SINT32,
    "sint64": FDP.TYPE_SINT64,
    "fixed32": FDP.TYPE_FIXED32,
    "fixed64": FDP.TYPE_FIXED64,
    "sfixed32": FDP.TYPE_SFIXED32,
    "sfixed64": FDP.TYPE_SFIXED64,
    "bool": FDP.TYPE_BOOL,
    "string": FDP.TYPE_STRING,
    "bytes": FDP.TYPE_BYTES,
}


@dataclass
class SeedField:
    name: str
    type_ref: str  # a scalar name, or a message's full name (events.Core, google.protobuf.Any)
    repeated: bool


@dataclass
class SeedMessage:
    file: str
    name: str  # as in the seed's heading: Core, Trace.TraceContextEntry
    fields: list[SeedField] = field(default_factory=list)

    @property
    def full_name(self) -> str:
        return f"events.{self.name}"


_FILE_HEADING = re.compile(r"^## (events/\w+\.proto)$")
_MESSAGE_HEADING = re.compile(r"^### ([\w.]+)$")
_ROW = re.compile(r"^\| (\w+) \| \[([\w.]+)\]\(#([\w.]+)\) \| (repeated)? ?\| .*\|$")


def parse_seed(text: str) -> dict[str, SeedMessage]:
    """Messages of the protoc-gen-doc markdown by full name, fields in the documented order."""
    messages: dict[str, SeedMessage] = {}
    current_file: str | None = None
    current: SeedMessage | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            match = _FILE_HEADING.match(line)
            current_file = match.group(1) if match else None
            current = None
        elif (match := _MESSAGE_HEADING.match(line)) and current_file is not None:
            current = SeedMessage(current_file, match.group(1))
            messages[current.full_name] = current
        elif line.startswith("| ") and current is not None and not line.startswith(("| Field", "| -")):
            row = _ROW.match(line)
            assert row, f"unparsed seed table row: {line!r}"
            name, _, anchor, repeated = row.groups()
            current.fields.append(SeedField(name, anchor, repeated is not None))
    return messages


SEED_MESSAGES = parse_seed(SEED.read_text(encoding="utf-8"))


def _is_entry(seed: SeedMessage) -> bool:
    return "." in seed.name and seed.name.endswith("Entry")


def _file_protos() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    protos = {}
    for module in MODULES:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        protos[proto.name] = proto
    return protos


FILES = _file_protos()


def _messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of a file, nested ones included, by full name."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        full_name = f"{prefix}.{message.name}"
        found[full_name] = message
        for nested in message.nested_type:
            walk(full_name, nested)

    for message in proto.message_type:
        walk(proto.package, message)
    return found


ALL_MESSAGES = {name: (file, message) for file, proto in FILES.items() for name, message in _messages(proto).items()}


def test_seed_parses_to_its_own_table_of_contents() -> None:
    listed = set(re.findall(r"^    - \[[\w.]+\]\(#(events\.[\w.]+)\)$", SEED.read_text(encoding="utf-8"), re.MULTILINE))
    assert len(listed) == 40
    assert set(SEED_MESSAGES) == listed
    assert SEED_MESSAGES["events.TriggerCacheRefresh"].fields == []
    assert [f.name for f in SEED_MESSAGES["events.MentionModifiedData"].fields] == [
        "mention_id",
        "organization_id",
        "mention_date",
        "transaction_timestamp",
    ]


def test_one_file_per_seed_section_all_proto3_in_package_events() -> None:
    assert set(FILES) == {m.file for m in SEED_MESSAGES.values()}
    for proto in FILES.values():
        assert proto.package == "events"
        assert proto.syntax == "proto3"


def test_no_message_beyond_the_seed() -> None:
    assert set(ALL_MESSAGES) == set(SEED_MESSAGES)


@pytest.mark.parametrize("full_name", sorted(SEED_MESSAGES))
def test_message_matches_seed(full_name: str) -> None:
    seed = SEED_MESSAGES[full_name]
    file, message = ALL_MESSAGES[full_name]
    assert file == seed.file
    assert message.options.map_entry == _is_entry(seed), "map entries are exactly the seed's *Entry types"
    assert len(message.field) == len(seed.fields)
    for number, (seed_field, actual) in enumerate(zip(seed.fields, message.field, strict=True), start=1):
        where = f"{full_name}.{seed_field.name}"
        assert actual.name == seed_field.name, where
        assert actual.number == number, where
        assert not actual.proto3_optional, where
        assert actual.label == (FDP.LABEL_REPEATED if seed_field.repeated else FDP.LABEL_OPTIONAL), where
        if seed_field.type_ref in SCALARS:
            assert actual.type == SCALARS[seed_field.type_ref], where
        else:
            assert actual.type == FDP.TYPE_MESSAGE, where
            assert actual.type_name == f".{seed_field.type_ref}", where


@pytest.mark.parametrize(
    ("message", "field_name"),
    [
        (core_pb2.Trace, "trace_context"),
        (core_pb2.Trace, "trace_tags"),
        (core_pb2.VtEvent, "baggage"),
    ],
)
def test_entry_fields_are_string_maps(message: type, field_name: str) -> None:
    field_descriptor = message.DESCRIPTOR.fields_by_name[field_name]
    entry = field_descriptor.message_type
    assert entry.GetOptions().map_entry
    assert [f.type for f in entry.fields] == [FDP.TYPE_STRING, FDP.TYPE_STRING]
    instance = message()
    getattr(instance, field_name)["k"] = "v"  # behaves as a dict, not a list of entries
    assert dict(getattr(instance, field_name)) == {"k": "v"}


def test_nested_messages_are_nested() -> None:
    mention = mention_notification_pb2.MentionEmailGenerated.Mention.DESCRIPTOR
    place_holders = mention_notification_pb2.MentionEmailGenerated.PlaceHolders.DESCRIPTOR
    assert mention.containing_type is mention_notification_pb2.MentionEmailGenerated.DESCRIPTOR
    assert place_holders.containing_type is mention_notification_pb2.MentionEmailGenerated.DESCRIPTOR
    assert place_holders.fields_by_name["mentions"].message_type is mention


def test_data_is_any_and_names_keep_their_case() -> None:
    assert core_pb2.VtEvent.DESCRIPTOR.fields_by_name["data"].message_type.full_name == "google.protobuf.Any"
    assert engine_pb2.engineBuildDeployFail.DESCRIPTOR.full_name == "events.engineBuildDeployFail"
    assert engine_pb2.engineBuildDeploySuccess.DESCRIPTOR.full_name == "events.engineBuildDeploySuccess"


def test_generated_modules_live_in_the_package() -> None:
    assert example_event_pb2.ExampleEvent.__module__ == "indexer.events.example_event_pb2"
    assert example_event_pb2.ExampleEvent.DESCRIPTOR.fields_by_name["core"].message_type is core_pb2.Core.DESCRIPTOR
