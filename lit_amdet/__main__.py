from lit_amdet.cli import main

main()
