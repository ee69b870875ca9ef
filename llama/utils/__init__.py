"""What every layer of the engine may use, depending on nothing above it: the validation
vocabulary (checks), the launcher's environment and the main rank (ranks), locks between
processes (locking), fetched registry files (assets), progress bars (progress), the CPU's
identity (cpu) and choices kept by measurement (measurements)."""
