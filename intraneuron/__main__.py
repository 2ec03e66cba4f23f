from intraneuron.cli import main

main()
