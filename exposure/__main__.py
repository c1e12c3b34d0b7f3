import sys

from exposure.ops.cli import main

code = main()
if sys.argv[1:2] == ["run"]:  # a node's supervisor, stopped: skip the teardown
    from exposure.node.process import exit_process

    exit_process(code)
sys.exit(code)
