"""`llamaforge plugins` and `llamaforge spec show`."""

from __future__ import annotations

import click

from llamaforge.cli._util import emit, json_option


@click.command("plugins")
@json_option
@click.option("--kind", default=None, help="Only this interface kind (norm, attention, sampler, ...).")
def plugins_cmd(as_json: bool, kind: str | None) -> None:
    """List every registered component by interface kind, with its source and version."""
    from llamaforge.registry import plugin_failures, registries

    regs = registries()
    kinds = [regs.kind(kind).kind] if kind else regs.kinds()
    rows = []
    for k in kinds:
        for e in regs.kind(k):
            rows.append(
                {
                    "kind": k,
                    "name": e.name,
                    "source": e.source.distribution,
                    "plugin": e.source.plugin,
                    "version": e.source.version,
                    "doc": e.doc,
                }
            )
    failures = [f.__dict__ for f in plugin_failures()]
    if as_json:
        emit(rows, True)
        return
    width = max((len(r["name"]) for r in rows), default=4)
    current = None
    for r in rows:
        if r["kind"] != current:
            current = r["kind"]
            click.echo(f"\n{current}:")
        click.echo(f"  {r['name']:<{width}}  {r['source']} {r['version']:<10} {r['doc']}")
    for f in failures:
        click.echo(f"\nfailed plugin {f['plugin']!r} ({f['distribution']} {f['version']}): {f['cause']}", err=True)


@click.group("spec")
def spec_group() -> None:
    """Inspect model specs."""


@spec_group.command("show")
@click.argument("name_or_file")
@json_option
def spec_show(name_or_file: str, as_json: bool) -> None:
    """Show the resolved spec, its parameter count (no weights allocated) and weight memory per precision."""
    import yaml

    from llamaforge.core.sizing import spec_summary

    summary = spec_summary(name_or_file)
    if as_json:
        emit(summary, True)
        return
    click.echo(yaml.safe_dump(summary["spec"], sort_keys=False).rstrip())
    d = summary["derived"]
    click.echo(f"\nderived: head_dim={d['head_dim']} n_kv_heads={d['n_kv_heads']} ffn_hidden={d['ffn_hidden']}")
    click.echo(f"parameters: {summary['params']:,}")
    for prec, nbytes in summary["weight_bytes"].items():
        click.echo(f"  weights at {prec:<5} {nbytes / 2**30:10.3f} GiB  ({nbytes:,} bytes)")


def register(cli: click.Group) -> None:
    cli.add_command(plugins_cmd)
    cli.add_command(spec_group)
