from llamaforge.cli import main

main()
