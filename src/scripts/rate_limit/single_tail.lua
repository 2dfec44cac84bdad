  end
  -- A bare 1 when the state is not wanted: a table reply costs Redis more than a number.
  if not want_state then return 1 end
  return { 1, 0, 0, remaining, math.ceil(math.max(reset, 0) / 1000) }
end
return { 0, 1, math.ceil(math.max(retry, 0) / 1000), remaining, math.ceil(math.max(reset, 0) / 1000) }
