from abliterate.cli.commands import main

main()
