#!/usr/bin/python3
"""nvidia-smi STAND-IN for the nemotron-deploy sandbox. This is NOT NVIDIA software and talks to no GPU.

Installed as /usr/local/bin/nvidia-smi on sandbox compute nodes only. It answers the invocations that
were captured on a real host with two H200 GPUs (driver 580.159.04; see COMMANDS.md next to the
captures) by printing those captures widened to this node's GPU count: GPU rows/blocks are
replicated from the captured ones with a new index, UUID, serial and PCI bus id, everything else byte
for byte as captured. Supported:
    nvidia-smi                          nvidia-smi -L
    nvidia-smi -q -x                    nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER
    nvidia-smi topo -m                  nvidia-smi nvlink -s
    nvidia-smi --query-gpu=<fields> --format=csv[,noheader][,nounits]     (any fields, any order)
    -i/--id=<index,...> with any of the above (except topo/nvlink)
--query-gpu answers from the per-GPU values of the captures (query-gpu.csv, health-query.csv, q.xml);
a field the captures don't hold prints [N/A]. Anything else fails with exit code 2 and says so.

Configuration (JSON, path in $NEMOTRON_SANDBOX_NVIDIA_SMI_CONFIG, default
/opt/nemotron-sandbox/nvidia-smi.json): {"gpus": 8, "captures": "<dir>", "faults": "<file>"}.
Fault injection for tests (JSON file named by "faults", read on every call; absent = healthy):
    {"gpus": 7}                        only the first 7 GPUs are visible
    {"ecc_uncorrected": {"3": 2}}      GPU 3 has 2 volatile (and aggregate) uncorrectable DRAM errors
    {"name": "NVIDIA H100 80GB HBM3"}  every GPU reports this model name
    {"driver_failure": true}           fail like a host whose driver is not loaded (exit 9)
Answer cache: with "cache": "<dir>" in the config, a healthy answer (no fault file, exit 0) is also
written to <dir>/<md5 of the arguments, one per line>, which the node's `nvidia-smi` front (a shell
script, see gpus.py) prints for the same arguments while no fault file exists: 128 sandbox nodes
share two cores, and Python's start-up per GPU query is the sandbox's cost, not the deploy's.
Standard library only: it runs with the node's /usr/bin/python3.
"""

import hashlib
import json
import os
import re
import socket
import sys
import xml.etree.ElementTree as ET

CONFIG_PATH = os.environ.get("NEMOTRON_SANDBOX_NVIDIA_SMI_CONFIG", "/opt/nemotron-sandbox/nvidia-smi.json")
DRIVER_FAILURE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)
ECC_QUERY = {"ECC", "PAGE_RETIREMENT", "ROW_REMAPPER"}


class Usage(Exception):
    """An invocation the stand-in has no capture for."""


def read(captures, name):
    with open(os.path.join(captures, name), encoding="utf-8", newline="") as f:
        return f.read()


# --- the captured GPUs and the GPUs of this node -------------------------------------------------


def xml_gpu_blocks(xml_text):
    """q.xml split into (head, [gpu element text...], tail); blocks are separated by one blank line."""
    blocks = re.findall(r"\t<gpu id=.*?\n\t</gpu>\n", xml_text, flags=re.S)
    head = xml_text[: xml_text.index(blocks[0])]
    tail = xml_text[xml_text.index(blocks[-1]) + len(blocks[-1]) :]
    return head, blocks, tail


def tag(block, name):
    m = re.search(rf"<{name}>(.*?)</{name}>", block)
    return m.group(1) if m else None


class Gpu:
    """One GPU of this node: copied from captured GPU `template`, with its own identity."""

    def __init__(self, index, template, captured, host, name, ecc):
        self.index = index
        self.template = template  # index of the captured GPU it copies
        self.captured = captured[template]  # identity strings of that captured GPU
        device = 6 + index  # the capture's GPUs sit at 00:06.0 and 00:07.0
        self.pci_device = f"{device:02X}"
        self.bus_id = f"00000000:00:{device:02X}.0"
        h = hashlib.sha256(f"{host}/gpu{index}".encode()).hexdigest()
        self.uuid = f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        self.serial = str(int(h[32:44], 16) % 10**13).zfill(13)
        self.pdi = "0x" + h[44:60]
        self.name = name or self.captured["name"]
        self.ecc = ecc


def captured_gpus(xml_text):
    _, blocks, _ = xml_gpu_blocks(xml_text)
    return [
        {
            "bus_id": re.search(r'<gpu id="([^"]+)">', b).group(1),
            "uuid": tag(b, "uuid"),
            "serial": tag(b, "serial"),
            "pdi": tag(b, "pdi"),
            "name": tag(b, "product_name"),
        }
        for b in blocks
    ]


def node_gpus(config, faults, xml_text):
    captured = captured_gpus(xml_text)
    count = min(int(faults.get("gpus", config["gpus"])), int(config["gpus"]))
    ecc = {int(k): int(v) for k, v in (faults.get("ecc_uncorrected") or {}).items()}
    host = socket.gethostname()
    return [
        Gpu(i, i % len(captured), captured, host, faults.get("name"), ecc.get(i, 0)) for i in range(count)
    ]


def rewrite_identity(text, gpu):
    """Replace the template GPU's identity strings (bus id, UUID, serial, PDI) with this GPU's."""
    c = gpu.captured
    for old, new in (
        (c["bus_id"], gpu.bus_id),
        (c["uuid"], gpu.uuid),
        (c["serial"], gpu.serial),
        (c["pdi"], gpu.pdi),
    ):
        text = text.replace(old, new)
    return text


# --- each captured output, widened ---------------------------------------------------------------


def gpu_xml(block, gpu):
    block = rewrite_identity(block, gpu)
    for name, value in (
        ("minor_number", str(gpu.index)),
        ("board_id", f"0x{6 + gpu.index:x}"),
        ("module_id", str(gpu.index + 1)),
        ("pci_device", gpu.pci_device),
        ("product_name", gpu.name),
    ):
        block = re.sub(rf"<{name}>.*?</{name}>", f"<{name}>{value}</{name}>", block, count=1)
    for section in ("volatile", "aggregate"):
        block = re.sub(
            rf"(<{section}>.*?<dram_uncorrectable>)\d+(</dram_uncorrectable>)",
            rf"\g<1>{gpu.ecc}\g<2>",
            block,
            count=1,
            flags=re.S,
        )
    return block


def show_xml(captures, gpus, selected):
    head, blocks, tail = xml_gpu_blocks(read(captures, "q.xml"))
    head = re.sub(r"<attached_gpus>\d+</attached_gpus>", f"<attached_gpus>{len(gpus)}</attached_gpus>", head)
    return head + "\n".join(gpu_xml(blocks[g.template], g) for g in selected) + tail


def show_table(captures, gpus):
    lines = read(captures, "nvidia-smi.txt").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|="))
    n_captured = len(captured_gpus(read(captures, "q.xml")))
    blocks = [lines[start + 1 + 4 * t : start + 5 + 4 * t] for t in range(n_captured)]
    out = lines[: start + 1]
    for g in gpus:
        block = [rewrite_identity(line, g) for line in blocks[g.template]]
        segs = block[0].split("|")
        m = re.match(r"^\s*\d+  (.*?)(\s+)(On|Off)(\s*)$", segs[1])
        right = m.group(3) + m.group(4)
        left = f"{g.index:>4}  {g.name}"[: len(segs[1]) - len(right) - 1]
        segs[1] = left.ljust(len(segs[1]) - len(right)) + right
        if segs[3].strip().isdigit():
            segs[3] = f"{g.ecc:>{len(segs[3]) - 1}} "
        block[0] = "|".join(segs)
        out += block
    out += lines[start + 1 + 4 * n_captured :]
    return "\n".join(out)


def show_list(gpus):
    return "".join(f"GPU {g.index}: {g.name} (UUID: {g.uuid})\n" for g in gpus)


def show_ecc(captures, gpus, selected):
    text = read(captures, "ecc.txt")
    parts = re.split(r"(?m)^(?=GPU [0-9A-F]{8}:)", text)
    head, blocks = parts[0], parts[1:]
    head = re.sub(r"(Attached GPUs\s+: )\d+", rf"\g<1>{len(gpus)}", head)
    out = []
    for g in selected:
        block = rewrite_identity(blocks[g.template], g)
        block = re.sub(r"(DRAM Uncorrectable\s+: )\d+", rf"\g<1>{g.ecc}", block)
        if not block.endswith("\n\n"):
            block = block.rstrip("\n") + "\n\n"
        out.append(block)
    result = head + "".join(out)
    return result if text.endswith("\n\n") else result[:-1]


def show_topo(captures, gpus):
    lines = read(captures, "topo.txt").split("\n")
    header = lines[0]
    m = re.match(r"^(\t\x1b\[4m)(GPU0\t.*?)(CPU Affinity.*)$", header)
    cols = "".join(f"GPU{g.index}\t" for g in gpus)
    out = [m.group(1) + cols + m.group(3)]
    row = lines[1].split("\t")  # GPU0, X, NV18, cpu affinity, numa, '', numa id
    n_captured = len([line for line in lines if re.match(r"^GPU\d+\t", line)])
    link = next(cell for cell in row[1 : 1 + n_captured] if cell.strip() != "X")
    tail = row[1 + n_captured :]
    for g in gpus:
        cells = [" X " if h is g else link for h in gpus]
        out.append("\t".join([f"GPU{g.index}", *cells, *tail]))
    rest = lines[1 + n_captured :]
    return "\n".join(out + rest)


def show_nvlink(captures, gpus):
    text = read(captures, "nvlink.txt")
    parts = re.split(r"(?m)^(?=GPU \d+: )", text)[1:]
    out = []
    for g in gpus:
        links = parts[g.template].split("\n", 1)[1]
        out.append(f"GPU {g.index}: {g.name} (UUID: {g.uuid})\n{links}")
    return "".join(out)


# --- --query-gpu ---------------------------------------------------------------------------------

ALIASES = {
    "gpu_name": "name",
    "gpu_uuid": "uuid",
    "gpu_bus_id": "pci.bus_id",
    "gpu_serial": "serial",
    "clocks_throttle_reasons.active": "clocks_event_reasons.active",
    "clocks.current.graphics": "clocks.gr",
    "clocks.graphics": "clocks.gr",
    "clocks.current.sm": "clocks.sm",
    "clocks.current.memory": "clocks.mem",
    "clocks.memory": "clocks.mem",
    "clocks.current.video": "clocks.video",
    "clocks.max.graphics": "clocks.max.gr",
    "clocks.max.memory": "clocks.max.mem",
    "retired_pages.sbe": "retired_pages.single_bit_ecc.count",
    "retired_pages.dbe": "retired_pages.double_bit.count",
    "enforced.power.limit": "power.limit",
}

# Fields answered from q.xml: field -> (unit or "", path in the <gpu> element, suffix to drop).
XML_FIELDS = {
    "serial": ("", "serial", ""),
    "vbios_version": ("", "vbios_version", ""),
    "pstate": ("", "performance_state", ""),
    "compute_mode": ("", "compute_mode", ""),
    "display_active": ("", "display_active", ""),
    "mig.mode.current": ("", "mig_mode/current_mig", ""),
    "mig.mode.pending": ("", "mig_mode/pending_mig", ""),
    "ecc.mode.pending": ("", "ecc_mode/pending_ecc", ""),
    "fan.speed": ("%", "fan_speed", ""),
    "memory.free": ("MiB", "fb_memory_usage/free", ""),
    "memory.reserved": ("MiB", "fb_memory_usage/reserved", ""),
    "utilization.gpu": ("%", "utilization/gpu_util", ""),
    "utilization.memory": ("%", "utilization/memory_util", ""),
    "temperature.memory": ("", "temperature/memory_temp", " C"),
    "power.draw.average": ("W", "gpu_power_readings/average_power_draw", ""),
    "power.draw.instant": ("W", "gpu_power_readings/instant_power_draw", ""),
    "power.limit": ("W", "gpu_power_readings/current_power_limit", ""),
    "power.default_limit": ("W", "gpu_power_readings/default_power_limit", ""),
    "power.min_limit": ("W", "gpu_power_readings/min_power_limit", ""),
    "power.max_limit": ("W", "gpu_power_readings/max_power_limit", ""),
    "clocks.gr": ("MHz", "clocks/graphics_clock", ""),
    "clocks.sm": ("MHz", "clocks/sm_clock", ""),
    "clocks.mem": ("MHz", "clocks/mem_clock", ""),
    "clocks.video": ("MHz", "clocks/video_clock", ""),
    "clocks.max.gr": ("MHz", "max_clocks/graphics_clock", ""),
    "clocks.max.sm": ("MHz", "max_clocks/sm_clock", ""),
    "clocks.max.mem": ("MHz", "max_clocks/mem_clock", ""),
    "pcie.link.gen.current": ("", "pci/pci_gpu_link_info/pcie_gen/current_link_gen", ""),
    "pcie.link.gen.max": ("", "pci/pci_gpu_link_info/pcie_gen/max_link_gen", ""),
    "pcie.link.width.current": ("", "pci/pci_gpu_link_info/link_widths/current_link_width", "x"),
    "pcie.link.width.max": ("", "pci/pci_gpu_link_info/link_widths/max_link_width", "x"),
    "retired_pages.single_bit_ecc.count": (
        "",
        "retired_pages/multiple_single_bit_retirement/retired_count",
        "",
    ),
    "retired_pages.double_bit.count": ("", "retired_pages/double_bit_retirement/retired_count", ""),
    "remapped_rows.correctable": ("", "remapped_rows/remapped_row_corr", ""),
    "remapped_rows.uncorrectable": ("", "remapped_rows/remapped_row_unc", ""),
}
ECC_SUMS = {
    "ecc.errors.corrected.volatile.total": ("volatile", ("sram_correctable", "dram_correctable")),
    "ecc.errors.corrected.aggregate.total": ("aggregate", ("sram_correctable", "dram_correctable")),
    "ecc.errors.uncorrected.volatile.total": (
        "volatile",
        ("sram_uncorrectable_parity", "sram_uncorrectable_secded", "dram_uncorrectable"),
    ),
    "ecc.errors.uncorrected.aggregate.total": (
        "aggregate",
        ("sram_uncorrectable_parity", "sram_uncorrectable_secded", "dram_uncorrectable"),
    ),
}


def parse_csv_capture(text):
    """A captured `--format=csv` file -> (labels by field, [values by field, per captured GPU])."""
    lines = [line for line in text.split("\n") if line]
    labels = {}
    for label in lines[0].split(", "):
        labels[label.split(" [")[0]] = label
    fields = list(labels)
    rows = [dict(zip(fields, line.split(", "), strict=True)) for line in lines[1:]]
    return labels, rows


def gpu_values(captures, gpus):
    """field -> label, and per GPU field -> value (with units), from the captures."""
    labels, per_template = {}, None
    for name in ("query-gpu.csv", "health-query.csv"):
        lab, rows = parse_csv_capture(read(captures, name))
        labels.update(lab)
        per_template = (
            rows if per_template is None else [{**a, **b} for a, b in zip(per_template, rows, strict=True)]
        )
    for field, (unit, _, _) in XML_FIELDS.items():
        labels.setdefault(field, f"{field} [{unit}]" if unit else field)
    for field in ECC_SUMS:
        labels.setdefault(field, field)
    labels["count"] = "count"
    _, blocks, _ = xml_gpu_blocks(read(captures, "q.xml"))
    values = []
    for g in gpus:
        elem = ET.fromstring(gpu_xml(blocks[g.template], g))
        v = dict(per_template[g.template])
        for field, (_, path, suffix) in XML_FIELDS.items():
            text = (elem.findtext(path) or "N/A").strip()
            if suffix and text.endswith(suffix):
                text = text[: -len(suffix)]
            v[field] = "[N/A]" if text == "N/A" else text
        for field, (section, keys) in ECC_SUMS.items():
            v[field] = str(sum(int(elem.findtext(f"ecc_errors/{section}/{k}") or 0) for k in keys))
        v.update(index=str(g.index), name=g.name, uuid=g.uuid, serial=g.serial, count=str(len(gpus)))
        v["pci.bus_id"] = g.bus_id
        values.append(v)
    return labels, values


def show_query(captures, gpus, selected, fields, fmt):
    opts = {o.strip() for o in fmt.split(",")}
    if "csv" not in opts:
        raise Usage(f"--format={fmt}: the stand-in only prints csv")
    labels, values = gpu_values(captures, gpus)
    by_index = {v["index"]: v for v in values}
    wanted = [ALIASES.get(f, f) for f in (f.strip() for f in fields.split(",")) if f]
    out = []
    if "noheader" not in opts:
        out.append(", ".join(labels.get(f, f) for f in wanted))
    for g in selected:
        v = by_index[str(g.index)]
        row = []
        for f in wanted:
            value = v.get(f, "[N/A]")
            unit = re.search(r"\[(.+)\]$", labels.get(f, ""))
            if "nounits" in opts and unit and value.endswith(" " + unit.group(1)):
                value = value[: -len(unit.group(1)) - 1]
            row.append(value)
        out.append(", ".join(row))
    return "".join(line + "\n" for line in out)


# --- command line ------------------------------------------------------------------------------


def parse(argv):
    """argv -> dict of options; `--opt=value` and `--opt value` both accepted."""
    opts = {"words": []}
    takes_value = {"-i": "id", "--id": "id", "-d": "display", "--display": "display", "--query-gpu": "query",
                   "--format": "format", "-f": "filename", "--filename": "filename"}  # fmt: skip
    flags = {"-L": "list", "--list-gpus": "list", "-q": "q", "--query": "q", "-x": "x", "--xml-format": "x",
             "-m": "matrix", "--matrix": "matrix", "-s": "status", "--status": "status",
             "-h": "help", "--help": "help"}  # fmt: skip
    args = list(argv)
    while args:
        a = args.pop(0)
        key, eq, value = a.partition("=")
        if key in takes_value:
            if not eq:
                if not args:
                    raise Usage(f"{a} needs a value")
                value = args.pop(0)
            opts[takes_value[key]] = value
        elif a in flags:
            opts[flags[a]] = True
        elif re.fullmatch(r"-[qxLms]{2,}", a):  # combined short flags, e.g. -qx
            for ch in a[1:]:
                opts[flags["-" + ch]] = True
        elif not a.startswith("-"):
            opts["words"].append(a)
        else:
            raise Usage(f"unsupported option {a}")
    return opts


def select(gpus, id_opt):
    if not id_opt:
        return gpus
    chosen = []
    for ident in id_opt.split(","):
        match = [g for g in gpus if ident.strip() in (str(g.index), g.uuid, g.bus_id)]
        if not match:
            raise LookupError(f"No devices were found matching {ident}")  # nvidia-smi's wording is similar
        chosen += match
    return chosen


def render(opts, captures, gpus):
    selected = select(gpus, opts.get("id"))
    words = opts["words"]
    if opts.get("help"):
        return __doc__
    if words == ["topo"] and opts.get("matrix"):
        return show_topo(captures, gpus)
    if words == ["nvlink"] and opts.get("status"):
        return show_nvlink(captures, gpus)
    if words:
        raise Usage(f"no capture for subcommand {' '.join(words)}")
    if "query" in opts:
        return show_query(captures, gpus, selected, opts["query"], opts.get("format", "csv"))
    if opts.get("list"):
        return show_list(selected)
    if opts.get("q") and opts.get("x") and "display" not in opts:
        return show_xml(captures, gpus, selected)
    if (
        opts.get("q")
        and not opts.get("x")
        and {d.strip().upper() for d in opts.get("display", "").split(",")} == ECC_QUERY
    ):
        return show_ecc(captures, gpus, selected)
    if not any(k for k in opts if k != "words" and k != "id"):
        return show_table(captures, selected)
    raise Usage("no capture for this combination of options")


def main(argv):
    with open(CONFIG_PATH) as f:
        config = json.load(f)
    faults = {}
    if config.get("faults") and os.path.exists(config["faults"]):
        with open(config["faults"]) as f:
            faults = json.load(f)
    if faults.get("driver_failure"):
        sys.stdout.write(DRIVER_FAILURE)
        return 9
    captures = config["captures"]
    gpus = node_gpus(config, faults, read(captures, "q.xml"))
    try:
        text = render(parse(argv), captures, gpus)
    except Usage as exc:
        sys.stderr.write(
            f"nvidia-smi (nemotron-deploy sandbox stand-in): {exc}: {' '.join(argv)}\n"
            "Only captured invocations are supported; see `nvidia-smi --help`.\n"
        )
        return 2
    except LookupError as exc:
        sys.stdout.write(f"{exc}\n")
        return 6
    sys.stdout.write(text)
    if config.get("cache") and not faults:
        remember(config["cache"], argv, text)
    return 0


def remember(cache, argv, text):
    """Keep the answer for the front script (atomically: a reader sees all of it or none)."""
    key = hashlib.md5("".join(f"{a}\n" for a in argv).encode()).hexdigest()
    tmp = os.path.join(cache, f".{key}.{os.getpid()}")
    try:
        os.makedirs(cache, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, os.path.join(cache, key))
    except OSError:  # a user who may not write there: the answer was given, just not kept
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
