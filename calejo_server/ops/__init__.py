"""Operations: the commands and checks an operator runs beside the adapter."""
