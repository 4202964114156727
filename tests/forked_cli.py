"""Run `selfevo` commands as forked children of this process, which imports selfevo once.

A crash test starts dozens of real `selfevo evolve` processes and kills them; importing torch,
transformers and Lightning afresh each time would take most of its time. This process imports
them once and forks a child per command: each child is a real process running `selfevo.cli.main`,
and SIGKILL ends it like any other. It computes nothing itself, so forking is safe.

Protocol, one JSON line each way: request {"args": [...], "env": {...}, "cwd": dir, "log": file};
reply {"exit": code} or {"signal": number}.
"""

import json
import os
import sys
import traceback

import selfevo.cli
import selfevo.loop  # noqa: F401  (the slow imports, done once)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = ["selfevo", *request["args"]]
            try:
                selfevo.cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    reply = (
        {"signal": os.WTERMSIG(status)}
        if os.WIFSIGNALED(status)
        else {"exit": os.WEXITSTATUS(status)}
    )
    print(json.dumps(reply), flush=True)
