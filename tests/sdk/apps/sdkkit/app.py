"""A test inferlet on the SDK; the first argument picks a scenario."""

from scenarios import SCENARIOS


async def main(args: list[str]) -> str | None:
    return await SCENARIOS[args[0]](args[1:])
