"""knocker.whitelist: the in-memory index, the grant rules and upstream whitelist.json entries."""

from __future__ import annotations

import ipaddress
import json

import pytest

from knocker.addresses import parse_network
from knocker.store.formats import NotCanonical, canonical_pairs, json_pieces, load_entries
from knocker.whitelist import (
    Key,
    Whitelist,
    entry_text,
    granted_expiry,
    key_of,
    parse_entry,
)

NOW = 1_700_000_000.0


def key(text: str) -> Key:
    network = parse_network(text)
    assert network is not None, text
    return key_of(network)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def filled(entries: dict[str, int]) -> Whitelist:
    table = Whitelist()
    for text, expiry in entries.items():
        table.set(key(text), expiry)
    return table


# --- entries: parsing and spelling ------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["1.2.3.4", "10.0.0.0/24", "0.0.0.0/0", "2001:db8::1", "2001:db8::/64", "::/0"]
)
def test_canonical_entries_round_trip(text: str) -> None:
    """A canonical entry parses and is spelled back exactly as written."""
    parsed = parse_entry(text)
    assert parsed is not None
    assert entry_text(parsed) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4/32", "1.2.3.4"),
        ("10.0.0.1/24", "10.0.0.0/24"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:db8:0:0::1/128", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::ffff:10.0.0.0/120", "10.0.0.0/24"),
        ("::1.2.3.4", "::102:304"),
    ],
)
def test_non_canonical_entries_parse_to_their_canonical_form(text: str, expected: str) -> None:
    """Host bits, upper case, /32 and IPv4-mapped spellings load as the canonical entry."""
    parsed = parse_entry(text)
    assert parsed is not None
    assert entry_text(parsed) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.2.3.4/",
        "1.2.3.4/33",
        "1.2.3.4/ 24",
        "1.2.3.4/-0",
        "01.2.3.4",
        "fe80::1%eth0",
        "example.com",
        "1.2.3.4 ",
        "::1/129",
    ],
)
def test_invalid_entries_do_not_parse(text: str) -> None:
    """Anything that is not an address or network parses to None."""
    assert parse_entry(text) is None


def test_entry_text_spells_low_ipv6_like_ipaddress() -> None:
    """IPv6 addresses below 2**32 use ipaddress's spelling, not glibc's ::a.b.c.d."""
    assert entry_text((6, 128, 1)) == "::1"
    assert entry_text((6, 128, 0x01020304)) == str(ipaddress.IPv6Address(0x01020304))


# --- lookups ----------------------------------------------------------------------------


def test_single_address_entry_allows_only_that_address() -> None:
    """A single-address entry allows exactly that address while unexpired."""
    table = filled({"192.0.2.7": int(NOW) + 60})
    assert table.allows(ip("192.0.2.7"), NOW)
    assert not table.allows(ip("192.0.2.8"), NOW)


def test_network_entry_allows_every_address_inside_it() -> None:
    """A CIDR entry allows its first and last address and nothing outside."""
    table = filled({"10.1.2.0/24": int(NOW) + 60, "2001:db8:1::/64": int(NOW) + 60})
    assert table.allows(ip("10.1.2.0"), NOW)
    assert table.allows(ip("10.1.2.255"), NOW)
    assert not table.allows(ip("10.1.3.0"), NOW)
    assert table.allows(ip("2001:db8:1::ffff"), NOW)
    assert not table.allows(ip("2001:db8:2::1"), NOW)


def test_entry_stops_allowing_at_its_expiry() -> None:
    """An entry allows strictly before its expiry and not at or after it."""
    expiry = int(NOW) + 60
    table = filled({"192.0.2.7": expiry})
    assert table.allows(ip("192.0.2.7"), expiry - 0.001)
    assert not table.allows(ip("192.0.2.7"), expiry)
    assert not table.allows(ip("192.0.2.7"), expiry + 1)


def test_families_never_mix_in_lookups() -> None:
    """An IPv4 entry never allows an IPv6 address with the same integer value."""
    table = filled({"0.0.0.1": int(NOW) + 60, "0.0.0.0/0": int(NOW) + 60})
    assert not table.allows(ip("::1"), NOW)
    assert table.allows(ip("198.51.100.1"), NOW)


def test_lookup_probes_one_table_per_prefix_length_in_use() -> None:
    """Lookups cost one hash probe per prefix length in use, however many entries exist."""
    table = Whitelist()
    for n in range(5000):
        table.set(key(str(ipaddress.IPv4Address(0x0A000000 + n))), int(NOW) + 60)
    table.set(key("172.16.0.0/12"), int(NOW) + 60)
    probes: list[int] = []

    class CountingDict(dict[int, int]):
        def get(self, *args: object) -> object:  # type: ignore[override]
            probes.append(1)
            return super().get(*args)  # type: ignore[call-overload]

    # Swap the real tables for counting copies; reindexing picks them up.
    for plen, inner in list(table._tables[4].items()):
        table._tables[4][plen] = CountingDict(inner)
    table._reindex(4)
    assert table.allows(ip("10.0.19.135"), NOW)
    assert not table.allows(ip("192.0.2.1"), NOW)
    assert len(probes) <= 1 + 2  # a hit on the first table, then two tables for a miss


def test_removing_an_entry_keeps_its_neighbours_allowed() -> None:
    """Removing one of several entries in the same /16 or /64 leaves the others working."""
    table = filled(
        {
            "10.1.2.3": int(NOW) + 60,
            "10.1.9.9": int(NOW) + 60,
            "10.1.2.0/24": int(NOW) + 60,
            "2001:db8::1": int(NOW) + 60,
            "2001:db8::2": int(NOW) + 60,
        }
    )
    table.remove(key("10.1.2.3"))
    table.remove(key("2001:db8::1"))
    assert table.allows(ip("10.1.9.9"), NOW)
    assert table.allows(ip("10.1.2.3"), NOW)  # still inside 10.1.2.0/24
    assert table.allows(ip("2001:db8::2"), NOW)
    assert not table.allows(ip("2001:db8::1"), NOW)
    table.remove(key("10.1.2.0/24"))
    assert not table.allows(ip("10.1.2.3"), NOW)


@pytest.mark.parametrize(
    ("entry", "inside", "outside"),
    [
        ("10.0.0.0/8", "10.200.1.1", "11.0.0.1"),
        ("10.1.0.0/16", "10.1.255.255", "10.2.0.0"),
        ("2001:db8::/32", "2001:db8:ffff::1", "2001:db9::1"),
        ("2001:db8:0:1::/64", "2001:db8:0:1:ffff::1", "2001:db8:0:2::1"),
    ],
)
def test_wide_networks_loaded_from_disk_still_match(entry: str, inside: str, outside: str) -> None:
    """Networks wider than a knock may grant (e.g. from an upstream file) still match."""
    table = filled({entry: int(NOW) + 60, "192.0.2.1": int(NOW) + 60})
    assert table.allows(ip(inside), NOW)
    assert not table.allows(ip(outside), NOW)


def test_set_replaces_expiry_without_adding_an_entry() -> None:
    """Setting an existing key updates its expiry and keeps the count."""
    table = filled({"192.0.2.7": 100})
    table.set(key("192.0.2.7"), 200)
    assert len(table) == 1
    assert table.expiry(key("192.0.2.7")) == 200


def test_remove_deletes_only_that_entry() -> None:
    """remove() drops one entry and reports whether it existed."""
    table = filled({"192.0.2.7": int(NOW) + 60, "10.0.0.0/8": int(NOW) + 60})
    assert table.remove(key("10.0.0.0/8"))
    assert not table.remove(key("10.0.0.0/8"))
    assert len(table) == 1
    assert not table.allows(ip("10.1.1.1"), NOW)
    assert table.allows(ip("192.0.2.7"), NOW)


def test_as_dict_uses_canonical_entry_text() -> None:
    """as_dict() yields the upstream whitelist.json shape: canonical entry -> int expiry."""
    table = filled(
        {
            "192.0.2.7/32": 100,
            "10.0.0.9/24": 200,
            "2001:DB8::1": 300,
            "::1.2.3.4": 400,
            "::ffff:10.0.0.1": 500,
        }
    )
    assert table.as_dict() == {
        "192.0.2.7": 100,
        "10.0.0.0/24": 200,
        "2001:db8::1": 300,
        "::102:304": 400,
        "10.0.0.1": 500,
    }


def test_as_dict_leaves_out_entries_expired_at_now() -> None:
    """as_dict(now) lists only entries that expire after now."""
    table = filled({"192.0.2.1": 100, "192.0.2.2": 200})
    assert table.as_dict(100) == {"192.0.2.2": 200}


def test_extend_keeps_the_later_expiry() -> None:
    """extend() never moves an expiry earlier."""
    table = filled({"192.0.2.1": 200})
    table.extend(key("192.0.2.1"), 100)
    table.extend(key("192.0.2.2"), 100)
    assert table.as_dict() == {"192.0.2.1": 200, "192.0.2.2": 100}
    table.extend(key("192.0.2.1"), 300)
    assert table.expiry(key("192.0.2.1")) == 300


def test_expired_lists_only_entries_at_or_past_their_expiry() -> None:
    """expired(now) names the entries whose expiry is <= now."""
    table = filled({"192.0.2.1": 100, "192.0.2.2": 200, "192.0.2.3": 300})
    assert sorted(entry_text(k) for k in table.expired(200)) == ["192.0.2.1", "192.0.2.2"]
    assert table.expired(50) == []


def test_expired_notices_entries_added_after_a_scan() -> None:
    """A short entry added after a scan is still reported once it expires."""
    table = filled({"192.0.2.1": 1000})
    assert table.expired(500) == []
    table.set(key("192.0.2.2"), 600)
    assert [entry_text(k) for k in table.expired(700)] == ["192.0.2.2"]


# --- capacity ---------------------------------------------------------------------------


def test_victims_are_the_soonest_expiring_entries() -> None:
    """At capacity, the entry that expires soonest is the one evicted."""
    table = filled({"192.0.2.1": 300, "192.0.2.2": 100, "192.0.2.3": 200})
    victims = table.victims(key("192.0.2.9"), capacity=3, now=0)
    assert [entry_text(v) for v in victims] == ["192.0.2.2"]


def test_victims_never_include_the_entry_being_granted() -> None:
    """The granted entry is never its own victim, even when it expires soonest."""
    table = filled({"192.0.2.1": 300, "192.0.2.2": 200})
    table.set(key("192.0.2.9"), 10)  # as if a replica already held it, expiring first
    victims = table.victims(key("192.0.2.9"), capacity=3, now=0)
    assert victims == []
    table.remove(key("192.0.2.9"))
    victims = table.victims(key("192.0.2.9"), capacity=2, now=0)
    assert key("192.0.2.9") not in victims
    assert [entry_text(v) for v in victims] == ["192.0.2.2"]


def test_no_victims_below_capacity_or_for_an_existing_entry() -> None:
    """Nothing is evicted below capacity, nor when the granted entry already exists."""
    table = filled({"192.0.2.1": 300, "192.0.2.2": 200})
    assert table.victims(key("192.0.2.9"), capacity=3, now=0) == []
    assert table.victims(key("192.0.2.1"), capacity=2, now=0) == []


def test_victims_shrink_an_over_full_whitelist_to_capacity() -> None:
    """When the table holds more than capacity (e.g. a smaller limit after restart),
    enough entries are evicted to fit the new one."""
    table = filled({f"192.0.2.{n}": 100 + n for n in range(1, 6)})
    victims = table.victims(key("198.51.100.1"), capacity=3, now=0)
    assert [entry_text(v) for v in victims] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


# --- grant arithmetic -------------------------------------------------------------------


def test_granted_expiry_rounds_up_to_whole_seconds() -> None:
    """A grant made at a fractional time never ends before now + ttl."""
    assert granted_expiry(None, 1000.2, 10) == 1011
    assert granted_expiry(None, 1000.0, 10) == 1010
    assert granted_expiry(None, 1000.999, 1) >= 1000.999 + 1


def test_granted_expiry_never_shortens_an_existing_grant() -> None:
    """Re-knocking with a shorter ttl keeps the later current expiry."""
    assert granted_expiry(5000, 1000.0, 10) == 5000


def test_granted_expiry_extends_an_existing_grant() -> None:
    """Re-knocking with a longer ttl moves the expiry later."""
    assert granted_expiry(1005, 1000.0, 100) == 1100


# --- upstream whitelist.json ------------------------------------------------------------


def loaded(data: object, now: float = NOW) -> tuple[dict[str, int], list[str]]:
    """(entry -> expiry loaded, complaints) for one whitelist.json object."""
    assert isinstance(data, dict)
    table = Whitelist()
    seen, problems = load_entries(data.items(), now, table)
    assert seen == len(data)
    return table.as_dict(), problems


def test_load_entries_reads_the_upstream_format() -> None:
    """{"entry": unix_expiry} loads as-is, networks included."""
    data = {"1.2.3.4": 1_700_000_100, "10.0.0.0/24": 1_700_000_200, "2001:db8::1": 1_700_000_300}
    assert loaded(data) == (data, [])


def test_load_entries_adds_to_an_existing_whitelist() -> None:
    """Loading keeps what the whitelist already holds and never shortens it."""
    table = filled({"192.0.2.1": 1_800_000_000, "192.0.2.2": 1_800_000_000})
    load_entries({"192.0.2.2": 1_700_000_100, "192.0.2.3": 1_700_000_100}.items(), NOW, table)
    assert table.as_dict() == {
        "192.0.2.1": 1_800_000_000,
        "192.0.2.2": 1_800_000_000,
        "192.0.2.3": 1_700_000_100,
    }


def test_load_entries_drops_expired_entries_silently() -> None:
    """Entries at or past their expiry are dropped without a complaint."""
    data = {"1.2.3.4": int(NOW), "1.2.3.5": int(NOW) - 1, "1.2.3.6": int(NOW) + 1}
    assert loaded(data) == ({"1.2.3.6": int(NOW) + 1}, [])


def test_load_entries_skips_invalid_entries_with_a_complaint() -> None:
    """Invalid addresses and non-numeric expiries are skipped, each named in a problem."""
    data = {
        "not-an-ip": 1_800_000_000,
        "1.2.3.4": "soon",
        "1.2.3.5": True,
        "1.2.3.6": None,
        "1.2.3.7": 1_800_000_000,
    }
    entries, problems = loaded(data)
    assert entries == {"1.2.3.7": 1_800_000_000}
    assert len(problems) == 4
    assert any("not-an-ip" in p for p in problems)


def test_load_entries_complaints_are_bounded_in_length() -> None:
    """A huge bogus entry name is not echoed in full."""
    entries, problems = loaded({"x" * 100_000: 1_800_000_000})
    assert entries == {}
    assert len(problems) == 1
    assert len(problems[0]) < 300


def test_load_entries_rounds_fractional_expiries_up() -> None:
    """A float expiry is honoured to the next whole second, never cut short."""
    assert loaded({"1.2.3.4": NOW + 10.25})[0] == {"1.2.3.4": int(NOW) + 11}


def test_load_entries_merges_spellings_of_one_entry_keeping_the_latest() -> None:
    """Two spellings of one network keep the later expiry, whatever their order."""
    data = {"10.0.0.7/24": 1_900_000_000, "10.0.0.0/24": 1_800_000_000}
    assert loaded(data)[0] == {"10.0.0.0/24": 1_900_000_000}


def test_canonical_pairs_reads_knockers_own_layout() -> None:
    """A file as Knocker writes it is read pair by pair, without a JSON object."""
    state = {"1.2.3.4": 1_800_000_000, "10.0.0.0/24": 1_800_000_001, "2001:db8::/64": 7}
    raw = json.dumps(state, separators=(", ", ": ")).encode()
    assert list(canonical_pairs(raw)) == list(state.items())
    assert list(canonical_pairs(b"{}")) == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{\n  "1.2.3.4": 1800000000\n}',  # indented (upstream's json.dump)
        b'{"1.2.3.4":1800000000}',  # other separators
        b'{"1.2.3.4": 1800000000, "1.2.3.5": 1.5}',  # a float
        b'{"1.2.3.4": 1800000000, "x\\"": 1}',  # an escape
        b'{"1.2.3.4": 1800000000',  # torn
        b"[]",
        b"",
        b'{"1.2.3.4": 1800000000}garbage}',
    ],
)
def test_canonical_pairs_leaves_every_other_layout_to_the_json_parser(raw: bytes) -> None:
    """Anything but the exact canonical layout raises NotCanonical (JSON parser decides)."""
    with pytest.raises(NotCanonical):
        list(canonical_pairs(raw))


@pytest.mark.parametrize("per_piece", [1, 2, 4096])
def test_json_pieces_are_exactly_the_snapshot_json(per_piece: int) -> None:
    """Streamed snapshot text equals json.dumps of as_dict, whatever the piece size, and
    reports the soonest expiry written (expired entries left out)."""
    table = filled(
        {
            "1.2.3.4": 1_800_000_003,
            "10.0.0.0/24": 1_800_000_001,
            "2001:db8::1": 1_800_000_002,
            "::102:304": 1_800_000_005,
            "2001:db8::/64": 1_800_000_004,
            "192.0.2.9": int(NOW) - 1,
        }
    )
    soonest = [0.0]
    text = b"".join(json_pieces(table, NOW, soonest, per_piece))
    expected = json.dumps(table.as_dict(NOW), separators=(", ", ": ")).encode()
    assert text == expected
    assert json.loads(text)["::102:304"] == 1_800_000_005
    assert "192.0.2.9" not in json.loads(text)
    assert soonest == [1_800_000_001]
    empty = [0.0]
    assert b"".join(json_pieces(Whitelist(), NOW, empty)) == b"{}"


def test_load_entries_skips_non_finite_and_out_of_range_expiries_one_by_one() -> None:
    """NaN, infinities and expiries past MAX_EXPIRY are complaints about their entry only;
    the other entries load."""
    table = Whitelist()
    data = {
        "1.2.3.4": float("nan"),
        "1.2.3.5": float("inf"),
        "1.2.3.6": float("-inf"),
        "1.2.3.7": 2**63,
        "1.2.3.8": 1e300,
        "5.6.7.8": 1_700_000_100,
    }
    seen, problems = load_entries(data.items(), NOW, table)
    assert seen == 6
    assert table.as_dict() == {"5.6.7.8": 1_700_000_100}
    assert len(problems) == 5
    assert all(p.startswith("'1.2.3.") for p in problems)
